"""QuantConfig validation, aliases, overrides and dict round trip."""

from __future__ import annotations

import json

import pytest

from vitquant.errors import ConfigError
from vitquant.quant import PRESETS, QuantConfig


def test_defaults_and_aliases() -> None:
    cfg = QuantConfig()
    assert cfg.preset == "robust" and cfg.wbits == 8 and cfg.abits == 8
    # the robust default: ft1's points, per-channel weights, SmoothQuant before the statistics
    assert cfg.points == QuantConfig("ft1").points
    assert cfg.effective_weight_granularity == "channel"
    assert (
        cfg.effective_passes == ["smooth"] and cfg.effective_pass_options["smooth"]["alpha"] == 0.5
    )
    # a config's own options update the preset's
    tuned = QuantConfig(pass_options={"smooth": {"alpha": "search"}})
    assert tuned.effective_pass_options["smooth"] == {
        "alpha": "search",
        "progress": False,
        "act_error_ratio": 0.5,
    }
    # presets choose the calibrator unless the config names one
    assert cfg.calibrator is None and cfg.effective_calibrator == "percentile"
    assert QuantConfig("lowbit").effective_calibrator == "mse"
    assert QuantConfig("lowbit", calibrator="max").effective_calibrator == "max"
    assert QuantConfig("ft2").effective_passes == []
    assert QuantConfig(preset="1").preset == "ft1"
    assert QuantConfig(preset="2").preset == "ft2"
    assert QuantConfig(preset=1).preset == "ft1"  # type: ignore[arg-type]
    assert QuantConfig(preset="FT3").preset == "ft3"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"preset": "ft9"}, "unknown preset"),
        ({"wbits": 1}, "wbits"),
        ({"abits": 17}, "abits"),
        ({"calibrator": "kl"}, "unknown calibrator"),
        ({"percentile": 0}, "percentile"),
        ({"softmax_quantizer": "log3"}, "softmax_quantizer"),
        ({"act_granularity": "pixel"}, "granularity"),
        ({"enable": ["nope"]}, "point kind"),
        ({"overrides": {"weight": {"bitz": 4}}}, "unknown option"),
        ({"overrides": {"weight": {"bits": 20}}}, "bits"),
        ({"version": 99}, "newer"),
    ],
)
def test_bad_values_raise_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        QuantConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_dict_round_trip_through_json() -> None:
    cfg = QuantConfig(
        "ft1",
        wbits=4,
        abits=6,
        softmax_quantizer="log2",
        ln_reparam=True,
        overrides={"blocks.0.*": {"bits": 8}},
        exclude=["blocks.1.mlp.*"],
    )
    back = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ConfigError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"presett": "ft1"})


def test_preset_defaults_resolve() -> None:
    assert QuantConfig("ft1").effective_weight_granularity == "channel"
    assert QuantConfig("ft2").effective_weight_granularity == "tensor"
    assert (
        QuantConfig("ft2", weight_granularity="channel").effective_weight_granularity == "channel"
    )
    repq = QuantConfig("repq")
    assert repq.effective_ln_reparam and repq.effective_softmax_quantizer == "log2_sqrt2"
    assert not repq.effective_act_symmetric
    assert not QuantConfig("repq", ln_reparam=False).effective_ln_reparam
    assert set(PRESETS) >= {"ft1", "ft2", "ft3", "trt"}


def test_point_options_and_overrides() -> None:
    cfg = QuantConfig(
        "ft1",
        wbits=4,
        abits=6,
        enable=["layernorm_input"],
        overrides={
            "softmax_output": {"quantizer": "log2", "bits": 4},
            "blocks.1.*.weight_quantizer": {"enabled": False},
            "aftergemm": {"enabled": True, "bits": 8},
        },
    )
    w = cfg.point_options("blocks.0.attn.qkv.weight_quantizer", "weight")
    assert w is not None and w["bits"] == 4 and w["granularity"] == "channel"
    assert cfg.point_options("blocks.1.attn.qkv.weight_quantizer", "weight") is None
    sm = cfg.point_options("blocks.0.attn.av_matmul.a_quantizer", "softmax_output")
    assert sm is not None and sm["quantizer"] == "log2" and sm["bits"] == 4
    assert cfg.point_options("blocks.0.attn.softmax.input_quantizer", "softmax_input") is None
    ag = cfg.point_options("blocks.0.mlp.fc1.output_quantizer", "aftergemm")
    assert ag is not None and ag["bits"] == 8
    ln = cfg.point_options("blocks.0.norm1.input_quantizer", "layernorm_input")
    assert ln is not None and ln["bits"] == 6

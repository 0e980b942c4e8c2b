"""Loss-aware ranges (``output_mse``): the search against a brute-force reference built on torch's
own fake-quant op, never-worse layer errors, and a lower model error on an outlier model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

import vitquant
from helpers import random_nano_vit
from vitquant.errors import ConfigError, DataError
from vitquant.methods.ptq.loss_aware import candidate_ratios, refine_ranges
from vitquant.models.activation_stats import output_agreement
from vitquant.quant import QuantConfig, calibrate, named_quantizers, prepare

CONFIG = dict(preset="ft1", wbits=8, abits=8, calibrator="max")


make_model = random_nano_vit


@pytest.fixture(scope="module")
def batches() -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 1, 28, 28, generator=g) for _ in range(3)]


def _quantized(model: torch.nn.Module, batches: list[Tensor], **kw: object) -> torch.nn.Module:
    q = copy.deepcopy(model)
    prepare(q, QuantConfig(**{**CONFIG, **kw}))
    calibrate(q, batches, progress=False)
    return q


def test_search_matches_a_brute_force_reference(batches: list[Tensor]) -> None:
    q = _quantized(make_model(), batches)
    layer = q.blocks[0].mlp.fc2
    xs: list[Tensor] = []
    h = layer.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with vitquant.quantization_disabled(q), torch.no_grad():
        for b in batches:
            q(b)
    h.remove()
    x = torch.cat(xs)
    old = float(layer.input_quantizer.amax)
    w = layer.weight.detach()
    wq = layer.weight_quantizer(w).detach()
    ref = x @ w.T
    # reference: torch.fake_quantize_per_tensor_affine over the same candidates
    top = max(old, float(x.abs().max()))
    cands = [old] + [top * float(r) for r in candidate_ratios()]
    errs = []
    for amax in cands:
        xq = torch.fake_quantize_per_tensor_affine(x, amax / 127.0, 0, -128, 127)
        errs.append(float(((xq @ wq.T) - ref).pow(2).mean()))
    best = cands[min(range(len(errs)), key=errs.__getitem__)]
    refine_ranges(q, batches, max_rows=10**9)
    assert float(layer.input_quantizer.amax) == pytest.approx(best, rel=1e-5)


def test_no_layer_error_gets_worse(batches: list[Tensor]) -> None:
    q = _quantized(make_model(), batches)
    choices = refine_ranges(q, batches)
    assert {c.name for c in choices} >= {"blocks.0.mlp.fc2.input_quantizer"}
    assert any(c.name.endswith("qk_matmul.a_quantizer") for c in choices)
    for c in choices:
        assert c.new_error <= c.old_error + 1e-12, c
    assert any(c.new_error < 0.9 * c.old_error for c in choices)


@pytest.mark.parametrize("bits", [4, 6])
def test_the_pass_beats_the_max_calibrator(batches: list[Tensor], bits: int) -> None:
    model = make_model()
    plain = _quantized(model, batches, wbits=bits, abits=bits)
    aware = _quantized(model, batches, wbits=bits, abits=bits, passes=["output_mse"])
    e_plain = output_agreement(model, plain, batches)["rel_error"]
    e_aware = output_agreement(model, aware, batches)["rel_error"]
    assert e_aware < e_plain, (e_aware, e_plain)
    # the weights and the weight ranges are the calibrator's: only activation ranges moved
    qs = dict(named_quantizers(plain))
    for name, qa in named_quantizers(aware):
        if qa.role == "weight":
            torch.testing.assert_close(qa.amax, qs[name].amax)


def test_bad_input_is_a_clear_error(batches: list[Tensor]) -> None:
    with pytest.raises(ConfigError, match="prepared"):
        refine_ranges(make_model(), batches)
    with pytest.raises(DataError, match="empty"):
        refine_ranges(_quantized(make_model(), batches), [])
    with pytest.raises(ConfigError, match="unknown calibration pass"):
        QuantConfig(passes=["no_such_pass"])
    with pytest.raises(ConfigError, match="unknown option"):
        calibrate(
            prepare(
                make_model(),
                QuantConfig(
                    **CONFIG, passes=["output_mse"], pass_options={"output_mse": {"bogus": 1}}
                ),
            ),
            batches,
            progress=False,
        )


def test_reference_uses_the_same_grid() -> None:
    r = candidate_ratios(8, 6)
    assert r[0] == 1.0 and r[-1] == pytest.approx(2**-6) and len(r) == 49
    assert torch.all(r[1:] < r[:-1])


def test_smoothed_layers_are_searched_on_what_their_quantizer_sees() -> None:
    """A SmoothQuant-smoothed Linear quantizes ``x / s``: the search must use that input (it
    once searched on ``x``, which made W4A4 logits 4x worse than without the pass)."""
    from helpers import digits_batches
    from vitquant.models.outliers import inject_outliers

    data = digits_batches()
    model = make_model()
    inject_outliers(model, data, kinds=("ln", "gelu"))
    with torch.no_grad():
        ref = torch.cat([model(x) for x in data])

    def error(passes: list[str]) -> tuple[float, torch.nn.Module]:
        cfg = QuantConfig(
            "robust", 4, 4, calibrator="mse", passes=passes,
            pass_options={"smooth": {"act_error_ratio": None}},  # fc2 smoothed whatever it gains
        )  # fmt: skip
        q = calibrate(prepare(copy.deepcopy(model), cfg), data, progress=False)
        with torch.no_grad():
            y = torch.cat([q(x) for x in data])
        return float((y - ref).norm() / ref.norm()), q

    without, _ = error(["smooth"])
    with_pass, q = error(["smooth", "output_mse"])
    assert with_pass <= 1.05 * without
    fc2 = q.blocks[1].mlp.fc2
    assert fc2.smooth_scale is not None  # the layer the old search got wrong is smoothed

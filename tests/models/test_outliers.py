"""Outlier injection (vitquant.models.outliers): each kind keeps the float function (exactly or
nearly), produces the outlier it states, and breaks plain per-tensor W8A8 PTQ; the statistics
agree with torch.quantile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from helpers import digits_batches, random_nano_vit
from vitquant.errors import ConfigError
from vitquant.models.activation_stats import ChannelHistogram, outlier_stats, output_agreement
from vitquant.models.outliers import (
    inject_gelu_outliers,
    inject_ln_outliers,
    inject_massive_tokens,
    inject_outliers,
)
from vitquant.quant import QuantConfig, calibrate, prepare

Q = 99.99


make_model = random_nano_vit


@pytest.fixture(scope="module")
def batches() -> list[Tensor]:
    return digits_batches()


def captured(model: nn.Module, name: str, batches: list[Tensor]) -> Tensor:
    """The first input of module ``name`` over all batches, as ``[values, channels]``."""
    seen: list[Tensor] = []
    hook = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for x in batches:
            model(x)
    hook.remove()
    return torch.cat(seen)


def reference_ratio(x: Tensor, channel: int, top_k: int = 4) -> float:
    """max|x[:, channel]| / quantile of |x| over the channels outside the top_k (torch)."""
    a = x.abs()
    top = torch.argsort(a.amax(0), descending=True)[:top_k]
    keep = torch.ones(a.shape[1], dtype=torch.bool)
    keep[top] = False
    return float(a[:, channel].max() / torch.quantile(a[:, keep].flatten(), Q / 100))


def ptq_error(model: nn.Module, batches: list[Tensor], preset: str) -> float:
    q = prepare(copy.deepcopy(model), QuantConfig(preset, wbits=8, abits=8))
    calibrate(q, batches, progress=False)
    return output_agreement(model, q, batches)["rel_error"]


def test_histogram_percentiles_match_torch_quantile() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30000, 16, generator=gen) * torch.linspace(0.5, 2.0, 16)
    x[:, 5] *= 40.0
    x[::7, 2] = 0.0
    h = ChannelHistogram()
    h.update(x[:12000].reshape(4, 3000, 16))
    h.update(x[12000:])
    a = x.abs()
    for q in (50.0, 99.0, Q):  # bins are 9% wide; the interpolation within one does better
        whole = float(torch.quantile(a.flatten(), q / 100))
        assert h.percentile(q) == pytest.approx(whole, rel=0.02)
        others = float(torch.quantile(a[:, [c for c in range(16) if c != 5]].flatten(), q / 100))
        assert h.percentile(q, exclude=[5]) == pytest.approx(others, rel=0.02)
    s = h.stats(Q, top_k=2)
    assert s.top_channels[0] == 5 and s.max == pytest.approx(float(a.max()))
    assert s.count == x.numel() and s.channels == 16
    assert s.ratio == pytest.approx(reference_ratio(x, 5, top_k=2), rel=0.1)
    assert s.ratio > 10 * s.top_ratio[1]


def test_ln_outliers_are_exact_and_scale_the_channels(batches: list[Tensor]) -> None:
    model = make_model()
    out = copy.deepcopy(model)
    names = ["blocks.0.attn.qkv", "blocks.1.mlp.fc1"]
    before = {n: captured(model, n, batches) for n in names}
    injections = inject_ln_outliers(out, factor=20.0)
    assert len(injections) == 4 and {i.layers[0] for i in injections} >= set(names)
    chans = injections[0].channels
    assert len(chans) == 2 and all(i.channels == chans for i in injections)
    with torch.no_grad():
        for x in batches:
            torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    stats = outlier_stats(out, batches, names)
    for n in names:
        after = captured(out, n, batches)
        others = [c for c in range(after.shape[1]) if c not in chans]
        torch.testing.assert_close(
            after[:, chans], 20.0 * before[n][:, chans], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(after[:, others], before[n][:, others])
        assert set(stats[n].top_channels[:2]) == set(chans)
        assert stats[n].ratio == pytest.approx(
            reference_ratio(after, stats[n].top_channels[0]), rel=0.1
        )
        assert stats[n].ratio > 5 * outlier_stats(model, batches, [n])[n].ratio


def test_gelu_outlier_reaches_target_with_logits_kept(batches: list[Tensor]) -> None:
    model = make_model()
    out = copy.deepcopy(model)
    inj = inject_gelu_outliers(out, batches, block=0, target_ratio=30.0)
    assert inj.layers == ["blocks.0.mlp.fc2"] and len(inj.channels) == 1
    j = inj.channels[0]
    x = captured(out, "blocks.0.mlp.fc2", batches)
    assert reference_ratio(x, j) >= 30.0 * 0.95
    stats = outlier_stats(out, batches, inj.layers)["blocks.0.mlp.fc2"]
    assert stats.top_channels[0] == j and stats.ratio >= 30.0 and inj.ratio == stats.ratio
    assert x[:, j].min() > 5.0  # GELU's linear regime: a massive, nearly constant channel
    agree = output_agreement(model, out, batches)
    assert agree["rel_error"] < 1e-3 and agree["agreement"] == 1.0
    assert inj.agreement["rel_error"] == pytest.approx(agree["rel_error"])
    other = copy.deepcopy(model)  # an explicit channel works too; the rest of the MLP is kept
    inj2 = inject_gelu_outliers(other, batches, block=1, channel=3, target_ratio=50.0)
    assert inj2.channels == [3] and inj2.ratio is not None and inj2.ratio >= 50.0
    assert output_agreement(model, other, batches)["rel_error"] < 0.05


def test_massive_tokens_ride_the_residual_stream(batches: list[Tensor]) -> None:
    model = make_model()
    out = copy.deepcopy(model)
    inj = inject_massive_tokens(out, batches, factor=50.0)
    assert inj.tokens == [1] and len(inj.channels) == 2  # the first patch token (class pooling)
    stream = outlier_stats(model, batches, ["blocks.0", "blocks.1"])
    for i in (0, 1):
        x = captured(out, f"blocks.{i}.add1", batches).reshape(-1, 50, 32)
        assert x[:, 1, inj.channels].abs().min() > 0.9 * inj.value
        assert x[:, 2:, inj.channels].abs().max() < 0.1 * inj.value  # only that token
        flat = x.reshape(-1, 32)
        assert reference_ratio(flat, inj.channels[0]) > 0.5 * 50.0
    assert inj.value == pytest.approx(50.0 * max(s.percentile for s in stream.values()))
    plain = copy.deepcopy(model)
    no_ft = inject_massive_tokens(plain, batches, factor=50.0, steps=0)
    err_plain = output_agreement(model, plain, batches)["rel_error"]
    err_ft = output_agreement(model, out, batches)["rel_error"]
    assert no_ft.agreement["rel_error"] == pytest.approx(err_plain)
    assert err_ft < 0.75 * err_plain and err_ft < 0.05  # the fine-tune brings the logits back
    assert inj.agreement["before_finetune"]["rel_error"] == pytest.approx(err_plain, rel=1e-3)
    masked = out.pos_embed[0, 1, inj.channels] - model.pos_embed[0, 1, inj.channels]
    torch.testing.assert_close(masked, torch.full_like(masked, inj.value))  # kept while tuning


@pytest.mark.parametrize(("kind", "preset"), [("ln", "ft1"), ("gelu", "ft1"), ("tokens", "trt")])
def test_each_kind_breaks_per_tensor_w8a8(batches: list[Tensor], kind: str, preset: str) -> None:
    # ft1/ft2 quantize no residual-stream tensor, so massive tokens show where trt/ft3 do
    model = make_model()
    base = ptq_error(model, batches, preset)
    out = copy.deepcopy(model)
    inject_outliers(out, batches, kinds=(kind,))
    assert output_agreement(model, out, batches)["rel_error"] < 0.05
    assert ptq_error(out, batches, preset) > 3 * base


def test_combined_kinds(batches: list[Tensor]) -> None:
    model = make_model()
    out = copy.deepcopy(model)
    done = inject_outliers(out, batches, kinds=("ln", "gelu", "tokens"))
    assert [i.kind for i in done] == ["ln"] * 4 + ["gelu", "tokens"]
    gelu, tokens = done[-2:]
    fc1 = f"{gelu.layers[0][: -len('fc2')]}fc1.weight"
    only_gelu = copy.deepcopy(model)
    inject_outliers(only_gelu, batches, kinds=("ln", "gelu"))
    tuned, untuned = out.get_parameter(fc1), only_gelu.get_parameter(fc1)
    mask = gelu.masks[fc1]
    assert torch.equal(tuned[mask], untuned[mask])  # the tokens' fine-tune kept the channel
    assert not torch.equal(tuned[~mask], untuned[~mask])  # and changed the rest
    assert output_agreement(model, out, batches)["rel_error"] < 0.05
    fc2 = outlier_stats(out, batches, gelu.layers)[gelu.layers[0]]
    assert fc2.top_channels[0] == gelu.channels[0] and fc2.ratio >= 30.0  # kept by the tune
    qkv = outlier_stats(out, batches, ["blocks.0.attn.qkv"])["blocks.0.attn.qkv"]
    assert set(done[0].channels) <= set(qkv.top_channels)
    assert tokens.ratio is not None and tokens.ratio > 25.0
    for preset in ("ft1", "trt"):
        assert ptq_error(out, batches, preset) > 3 * ptq_error(model, batches, preset)
    assert gelu.to_dict()["channels"] == gelu.channels and "masks" not in gelu.to_dict()


def test_bad_input_is_a_config_error(batches: list[Tensor]) -> None:
    model = make_model()
    with pytest.raises(ConfigError, match="unknown outlier kind"):
        inject_outliers(model, batches, kinds=("spikes",))
    with pytest.raises(ConfigError, match="need batches"):
        inject_outliers(model, None, kinds=("gelu",))
    with pytest.raises(ConfigError, match="factor"):
        inject_ln_outliers(model, factor=0.0)
    with pytest.raises(ConfigError, match="channels"):
        inject_ln_outliers(model, channels=[32])
    with pytest.raises(ConfigError, match="block 5"):
        inject_gelu_outliers(model, batches, block=5)
    with pytest.raises(ConfigError, match="channel"):
        inject_gelu_outliers(model, batches, channel=64)
    with pytest.raises(ConfigError, match="no module"):
        outlier_stats(model, batches, ["blocks.9"])
    prepared = prepare(copy.deepcopy(model), QuantConfig("ft1"))
    with pytest.raises(ConfigError, match="before prepare"):
        inject_ln_outliers(prepared)
    with pytest.raises(ConfigError, match="transformer blocks"):
        inject_ln_outliers(nn.Sequential(nn.Linear(2, 2)))

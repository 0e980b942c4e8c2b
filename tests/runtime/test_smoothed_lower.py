"""Lowering linears that carry SmoothQuant factors (``QuantLinear.smooth_scale``): the integer
model folds them into the input quantization and matches the fake-quant model it comes from.

The factors are set by hand here (random, with the weight columns scaled to match), on every
linear of every block, so that each place the runtime quantizes a linear's input is exercised:
the LayerNorm-and-quantize pass (qkv, fc1), the ``attn·v`` requantization (proj) and fc1's GELU
epilogue (fc2)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import vitquant
from helpers import randomize_affine
from vitquant.quant import QuantConfig, calibrate, prepare, quantization_disabled
from vitquant.runtime import Int8Block, Int8Linear, lower, lowering_report, onednn_available
from vitquant.runtime.kernels import ActQ, quantize_act

BACKENDS = ["reference", "intmm"] + (["onednn"] if onednn_available() else [])
LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _smooth_by_hand(model: nn.Module, layers: tuple[str, ...] = LAYERS) -> None:
    """``x / s`` before each input quantizer and ``W diag(s)``: the float function is kept."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            for name in layers:
                lin = block.get_submodule(name)
                s = torch.exp(torch.empty(lin.in_features).uniform_(-1.5, 1.5, generator=gen))
                lin.weight.mul_(s)
                lin.smooth_scale = s


def _models(preset: str, init_values: float | None = 0.5) -> tuple[nn.Module, nn.Module]:
    """``(plain, smoothed)`` prepared copies of one random model; the smoothed one calibrated."""
    torch.manual_seed(0)
    m = vitquant.create_model("vit_micro_patch4_28", num_classes=10, init_values=init_values)
    randomize_affine(m.eval())
    prepare(m, QuantConfig(preset=preset))
    smoothed = copy.deepcopy(m)
    _smooth_by_hand(smoothed)
    calibrate(
        smoothed, [torch.randn(16, 1, 28, 28) for _ in range(2)], method="max", progress=False
    )
    return m, smoothed


def _rel(y: Tensor, ref: Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def test_smoothing_by_hand_keeps_the_float_function() -> None:
    plain, smoothed = _models("ft1")
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad(), quantization_disabled(smoothed):
        assert _rel(smoothed(x), plain(x)) < 1e-5
    assert "blocks.0.mlp.fc2.smooth_scale" in smoothed.state_dict()
    assert not any(k.endswith("smooth_scale") for k in plain.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["ft1", "ft2"])
@pytest.mark.parametrize("fuse", [True, False])
def test_smoothed_block_matches_fake_quant_block(backend: str, preset: str, fuse: bool) -> None:
    """As ``test_lowered_block_matches_fake_quant_block``, with every linear smoothed: a
    smoothing factor lost or applied twice anywhere moves the output far beyond these bounds."""
    _, m = _models(preset)
    seen: dict[str, Tensor] = {}
    hook = m.blocks[1].register_forward_hook(lambda mod, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        m(torch.randn(8, 1, 28, 28))
    hook.remove()
    low = lower(copy.deepcopy(m), backend, fuse=fuse, warn=False)
    assert isinstance(low.blocks[1], Int8Block) == fuse
    smoothed = set(lowering_report(low)["smoothed"])
    assert {f"blocks.1.{n}" for n in LAYERS} <= smoothed
    with torch.no_grad():
        y = low.blocks[1](seen["x"])
    err, ref = (y - seen["y"]).abs(), seen["y"].abs()
    assert float(err.mean() / ref.mean()) < 1e-3
    assert float(err.max() / ref.max()) < 5e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_smoothed_model_matches_fake_quant(backend: str) -> None:
    _, m = _models("ft1")
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        ref = m(x)
        y = lower(copy.deepcopy(m), backend, warn=False)(x)
    cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)
    assert float(cos) > 0.999
    assert float((y.argmax(1) == ref.argmax(1)).float().mean()) >= 0.9


def test_smoothed_linear_folds_the_factors_into_its_input_scale() -> None:
    _, m = _models("ft1")
    lin = m.blocks[0].mlp.fc2
    s = lin.smooth_scale
    x = torch.randn(4, 50, lin.in_features) * 3
    with torch.no_grad():
        ref = lin(x)
        for backend in BACKENDS:
            low, why = Int8Linear.from_quant(lin, backend)
            assert low is not None, why
            assert low.in_div is not None
            torch.testing.assert_close(low.in_div, s * low.act.scale)
            torch.testing.assert_close(low(x), ref, rtol=1e-4, atol=1e-4)


def test_quantize_act_with_a_per_channel_divisor() -> None:
    a = ActQ(0.05, 3, -128, 127)
    div = torch.tensor([0.5, 1.0, 2.0, 4.0]) * a.scale
    x = torch.randn(64, 4) * 4
    want = torch.clamp(torch.round(x / div) + 3, -128, 127)
    for dtype in (torch.int8, torch.uint8):
        got = quantize_act(x.clone(), a, dtype, div=div).to(torch.int32) - a.offset(dtype)
        assert torch.equal(got.float(), want)

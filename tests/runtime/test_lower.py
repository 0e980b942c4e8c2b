"""``lower(model)``: integer models against the fake-quant models they come from."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import vitquant
from helpers import has_layer_scale, randomize_affine
from vitquant.errors import ConfigError
from vitquant.quant import QuantConfig, QuantLinear, QuantMatMul, calibrate, prepare
from vitquant.runtime import (
    Int8Block,
    Int8Linear,
    Int8MatMul,
    lower,
    lowering_report,
    onednn_available,
)

BACKENDS = ["reference", "intmm"] + (["onednn"] if onednn_available() else [])


def _calibrated(
    preset: str = "ft1",
    name: str = "vit_micro_patch4_28",
    init_values: float | None = 0.5,
    **cfg: object,
) -> nn.Module:
    """A calibrated model whose biases, LayerNorms and LayerScales (``init_values``) are random,
    so that lowering them wrongly changes the output."""
    torch.manual_seed(0)
    m = vitquant.create_model(name, num_classes=10, init_values=init_values).eval()
    randomize_affine(m)
    prepare(m, QuantConfig(preset=preset, **cfg))  # type: ignore[arg-type]
    calibrate(m, [torch.randn(16, 1, 28, 28) for _ in range(2)], method="max", progress=False)
    return m


def _compare(m: nn.Module, backend: str, fuse: bool) -> tuple[float, float]:
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        ref = m(x)
        low = lower(copy.deepcopy(m), backend, fuse=fuse, warn=False)
        y = low(x)
    rel = float((y - ref).abs().max() / ref.abs().max())
    agree = float((y.argmax(1) == ref.argmax(1)).float().mean())
    return rel, agree


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["ft1", "ft2"])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("layer_scale", [None, 0.5])
def test_lowered_model_matches_fake_quant(
    backend: str, preset: str, fuse: bool, layer_scale: float | None
) -> None:
    m = _calibrated(preset, init_values=layer_scale)
    assert has_layer_scale(m) == (layer_scale is not None)
    rel, agree = _compare(m, backend, fuse)
    # int8 codes equal the fake-quant codes except where float rounding of a GEMM result
    # crosses a rounding boundary of the next quantizer; those flips stay small
    assert rel < 0.1
    assert agree >= 0.9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["ft1", "ft2"])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("layer_scale", [None, 0.5])
def test_lowered_block_matches_fake_quant_block(
    backend: str, preset: str, fuse: bool, layer_scale: float | None
) -> None:
    """One block, on the very input the fake-quant block sees: the integer block's output is
    the fake-quant one up to a few float-rounding flips of single codes, tight enough that a
    lost or misplaced bias, LayerNorm parameter or LayerScale (all random here) fails."""
    m = _calibrated(preset, init_values=layer_scale)
    seen: dict[str, torch.Tensor] = {}
    hook = m.blocks[1].register_forward_hook(lambda mod, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        m(torch.randn(8, 1, 28, 28))
    hook.remove()
    low = lower(copy.deepcopy(m), backend, fuse=fuse, warn=False)
    assert isinstance(low.blocks[1], Int8Block) == fuse
    with torch.no_grad():
        y = low.blocks[1](seen["x"])
    err, ref = (y - seen["y"]).abs(), seen["y"].abs()
    assert float(err.mean() / ref.mean()) < 1e-3
    assert float(err.max() / ref.max()) < 5e-3


def test_lower_replaces_modules_and_reports() -> None:
    m = _calibrated("ft1")
    lower(m, "reference", fuse=True)
    rep = lowering_report(m)
    assert rep["backend"] == "reference"
    assert len(rep["blocks"]) == 6 and rep["kept"] == {}
    assert isinstance(m.blocks[0], Int8Block)
    assert not any(isinstance(x, QuantLinear) for x in m.blocks.modules())

    m = _calibrated("ft2")
    lower(m, "reference", fuse=False)
    assert isinstance(m.blocks[0].attn.qkv, Int8Linear)
    assert isinstance(m.blocks[0].attn.qk_matmul, Int8MatMul)
    assert lowering_report(m)["linears"]


def test_single_linear_is_exact_up_to_float_rounding() -> None:
    """An Int8Linear sees the same integer codes as the fake-quant QuantLinear."""
    m = _calibrated("ft1")
    lin = m.blocks[0].mlp.fc1
    x = torch.randn(8, 50, lin.in_features)
    with torch.no_grad():
        ref = lin(x)
        for backend in BACKENDS:
            low, why = Int8Linear.from_quant(lin, backend)
            assert low is not None, why
            torch.testing.assert_close(low(x), ref, rtol=1e-4, atol=1e-5)


def test_single_matmul_matches_fake_quant() -> None:
    m = _calibrated("ft1")
    mm = m.blocks[0].attn.qk_matmul
    assert isinstance(mm, QuantMatMul)
    a, b = torch.randn(2, 4, 50, 32) * 0.3, torch.randn(2, 4, 32, 50)
    with torch.no_grad():
        ref = mm(a, b)
        low, _ = Int8MatMul.from_quant(mm, "intmm")
        assert low is not None
        torch.testing.assert_close(low(a, b), ref, rtol=1e-4, atol=1e-5)


def test_four_bit_weights_run_on_int8_kernels() -> None:
    rel, agree = _compare(_calibrated("ft1", wbits=4), BACKENDS[-1], True)
    assert rel < 0.1 and agree >= 0.9


def test_layer_scale_and_distilled_model() -> None:
    torch.manual_seed(0)
    m = vitquant.create_model("deit_nano_distilled_patch4_28", num_classes=10, init_values=0.5)
    randomize_affine(m.eval())
    prepare(m, QuantConfig(preset="ft1"))
    calibrate(m, [torch.randn(16, 1, 28, 28)], method="max", progress=False)
    rel, agree = _compare(m, BACKENDS[-1], True)
    assert rel < 0.1 and agree >= 0.9


def test_unsupported_points_stay_fake_quant() -> None:
    m = _calibrated("ft1", softmax_quantizer="log2")
    with pytest.warns(UserWarning, match="fake-quant"):
        low = lower(copy.deepcopy(m), "reference", fuse=False)
    kept = lowering_report(low)["kept"]
    assert any("av_matmul" in k and "log2" in v for k, v in kept.items())
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert float((low(x) - m(x)).abs().max() / m(x).abs().max()) < 0.1
    # fused blocks fall back to the fake-quant av matmul inside the block
    fused = lower(copy.deepcopy(m), "reference", warn=False)
    assert isinstance(fused.blocks[0], Int8Block)
    with torch.no_grad():
        assert float((fused(x) - m(x)).abs().max() / m(x).abs().max()) < 0.1


def test_refuses_uncalibrated_and_unprepared() -> None:
    m = vitquant.create_model("vit_nano_patch4_28", num_classes=10).eval()
    with pytest.raises(ConfigError, match="no quantizers"):
        lower(copy.deepcopy(m))
    prepare(m, QuantConfig(preset="ft1"))
    with pytest.raises(ConfigError, match=r"never calibrated: blocks\.0\."):
        lower(m)
    with pytest.raises(ConfigError, match="unknown int8 backend"):
        calibrate(m, [torch.randn(2, 1, 28, 28)], method="max", progress=False)
        lower(m, "cublas")


def test_lower_twice_refused() -> None:
    m = lower(_calibrated("ft1"), "reference")
    with pytest.raises(ConfigError, match="already lowered"):
        lower(m)


@pytest.mark.gpu
def test_lower_on_cuda() -> None:
    m = _calibrated("ft1").cuda()
    x = torch.randn(32, 1, 28, 28, device="cuda")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = m(x)
        y = lower(copy.deepcopy(m))(x)
    assert float((y - ref).abs().max() / ref.abs().max()) < 0.1


@pytest.mark.parametrize("init_values", [None, 0.5])
def test_timm_vit_lowers_to_fused_blocks(timm, init_values: float | None) -> None:
    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=2,
        init_values=init_values,
    ).eval()  # fmt: skip
    randomize_affine(m)
    assert has_layer_scale(m) == (init_values is not None)
    prepare(m, QuantConfig(preset="ft2"))
    x = torch.randn(4, 3, 64, 64)
    calibrate(m, [x], method="max", progress=False)
    with torch.no_grad():
        ref = m(x)
        low = lower(copy.deepcopy(m), BACKENDS[-1], warn=False)
        y = low(x)
    assert lowering_report(low)["blocks"] == ["blocks.0", "blocks.1"]
    assert float((y - ref).abs().max() / ref.abs().max()) < 0.1

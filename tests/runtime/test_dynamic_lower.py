"""Lowering per-token dynamic Linear inputs (``DynamicInt8Linear``): the integer layer against a
float64 numpy re-derivation of its formula and against the fake-quant layer, on every backend,
symmetric and asymmetric, with and without SmoothQuant factors; whole models lowered."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import vitquant
from vitquant.quant import QuantConfig, calibrate, prepare
from vitquant.runtime import lower, lowering_report, native, onednn_available
from vitquant.runtime.dynamic import DynamicInt8Linear
from vitquant.runtime.kernels import ActQ

BACKENDS = ["reference", "intmm"] + (["onednn"] if onednn_available() else [])


def _linear(symmetric: bool, bits: int = 8, smooth: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """A calibrated fake-quant Linear with a dynamic input (in a one-layer model), and inputs
    with tokens of very different magnitudes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 20))
    cfg = QuantConfig("ft1", wbits=8, abits=bits, act_dynamic=True, act_symmetric=symmetric)
    prepare(model, cfg)
    lin = model[0]
    if smooth:
        s = torch.exp(torch.empty(48).uniform_(-1.0, 1.0))
        with torch.no_grad():
            lin.weight.mul_(s)
        lin.smooth_scale = s
    x = torch.randn(3, 17, 48) * torch.exp(2 * torch.randn(3, 17, 1)) + 0.3
    calibrate(model, [x], method="max", progress=False)
    return lin, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("smooth", [False, True])
def test_integer_layer_matches_fake_quant_and_its_formula(
    backend: str, symmetric: bool, smooth: bool
) -> None:
    lin, x = _linear(symmetric, smooth=smooth)
    low, why = DynamicInt8Linear.from_quant(lin, backend)
    assert low is not None, why
    with torch.no_grad():
        y_fq, y = lin(x), low(x)
    assert y.shape == y_fq.shape == (3, 17, 20)
    rel = float((y - y_fq).norm() / y_fq.norm())
    assert rel < 1e-4, rel
    # the documented formula in float64 numpy: y = s_m w_n (x_q c^T - z_m sum_k c) + b
    xq, s, z, _ = low.quantize_input(x)
    xq = xq.numpy().astype(np.float64) - low.offset
    c = low.weight.codes.numpy().astype(np.float64)
    ref = (
        s.double().numpy()
        * low.weight.scale.double().numpy()
        * (xq @ c.T - z.double().numpy() * c.sum(1))
        + lin.bias.detach().double().numpy()
    )
    assert np.abs(y.reshape(-1, 20).double().numpy() - ref).max() < 1e-4 * np.abs(ref).max()


def test_four_bit_rows_and_refusals() -> None:
    lin, x = _linear(False, bits=4)
    low, _ = DynamicInt8Linear.from_quant(lin, "reference")
    assert low is not None
    with torch.no_grad():
        assert float((low(x) - lin(x)).norm() / lin(x).norm()) < 1e-5
    wide, _ = _linear(True, bits=10)
    none, why = DynamicInt8Linear.from_quant(wide, "reference")
    assert none is None and "8 bits" in why
    plain = nn.Linear(4, 4)
    assert DynamicInt8Linear.from_quant(plain, "reference") == (None, "input: not quantized")


ONLY_FC2 = {
    "linear_input": {"quantizer": "uniform"},
    "*.fc2.input_quantizer": {"quantizer": "dynamic"},
}


@pytest.mark.parametrize(
    ("preset", "backend", "dtype", "overrides"),
    [
        ("robust", None, torch.float32, {}),
        ("ft1", None, torch.float32, {}),
        ("ft1", "reference", torch.float32, {}),
        ("robust", None, torch.bfloat16, {}),
        ("ft1", None, torch.float32, ONLY_FC2),
        ("ft1", "reference", torch.float32, ONLY_FC2),
    ],
)
def test_lowered_model_agrees_with_its_fake_quant_model(
    preset: str, backend: str | None, dtype: torch.dtype, overrides: dict
) -> None:
    torch.manual_seed(0)
    m = vitquant.create_model("vit_micro_patch4_28", num_classes=10).eval()
    prepare(m, QuantConfig(preset, wbits=8, abits=8, act_dynamic=True, overrides=overrides))
    x = torch.randn(24, 1, 28, 28)
    calibrate(m, [x[:12], x[12:]], progress=False)
    low = lower(copy.deepcopy(m), backend, warn=False, float_dtype=dtype)
    rep = lowering_report(low)
    linears = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and "blocks" in n]
    if overrides:
        linears = [n for n in linears if n.endswith("fc2")]
    assert sorted(rep["dynamic"]) == sorted(linears) and not rep["kept"]
    assert len(rep["blocks"]) == len(m.blocks)  # the blocks stay fused
    with torch.no_grad():
        y_fq, y = m(x), low(x)
    cos = float(torch.nn.functional.cosine_similarity(y.flatten(), y_fq.flatten(), 0))
    assert cos > (0.999 if dtype == torch.bfloat16 else 0.9999)
    assert (y.argmax(1) == y_fq.argmax(1)).float().mean() >= 0.95
    unfused = lower(copy.deepcopy(m), backend, fuse=False, warn=False)
    assert not lowering_report(unfused)["blocks"]
    with torch.no_grad():
        y_u = unfused(x)
    assert float(torch.nn.functional.cosine_similarity(y_u.flatten(), y_fq.flatten(), 0)) > 0.9999


def test_after_gemm_quantizer_keeps_the_layer_in_fake_quant() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    prepare(model, QuantConfig("ft2", act_dynamic=True))
    calibrate(model, [torch.randn(4, 16)], progress=False)
    low, why = DynamicInt8Linear.from_quant(model[0], "reference")
    assert low is None and "after-GEMM" in why


@pytest.mark.skipif(not native.available(), reason=native.why_unavailable() or "native")
@pytest.mark.parametrize("symmetric", [True, False])
def test_native_epilogue_matches_the_torch_path(symmetric: bool) -> None:
    """The one-pass native epilogue against the torch ops it replaces (``native = False``):
    bit-exact float32/bfloat16 results with a residual, equal codes on a folded (1, 0) grid,
    GELU after it."""
    if not onednn_available():
        pytest.skip("needs oneDNN")
    lin, x = _linear(symmetric)
    fast, _ = DynamicInt8Linear.from_quant(lin, "onednn")
    slow = copy.deepcopy(fast)
    slow.native = False
    c = fast.quantize_input(x)
    r = torch.randn(3, 17, 20)
    grid = ActQ(1.0, 0, -127, 127)
    kw_cases = [
        {"bias": fast.bias, "other": r},
        {"bias": fast.bias, "other": r.bfloat16(), "out_dtype": torch.bfloat16},
        {
            "bias": fast.bias,
            "w_scale": fast.weight.scale * 40,
            "out": grid,
            "out_dtype": torch.int8,
        },
        {"bias": fast.bias, "post": "gelu", "other": r},
    ]
    for kw in kw_cases:
        got, want = fast.forward_codes(c, **kw), slow.forward_codes(c, **kw)
        assert got.dtype == want.dtype and got.shape == (3, 17, 20)
        assert torch.equal(got, want), kw.keys()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fused_blocks_keep_the_fast_attention_with_dynamic_inputs(backend: str) -> None:
    """With every Linear input per token, the LayerNorms quantize rows on their own grids and
    ``qkv``'s epilogue writes the q/k/v codes, so the fused attention kernels still run."""
    from vitquant.runtime.layernorm import LayerNormRowQuant

    torch.manual_seed(0)
    m = vitquant.create_model("vit_micro_patch4_28", num_classes=10).eval()
    prepare(m, QuantConfig(wbits=8, abits=8, act_dynamic=True))
    x = torch.randn(16, 1, 28, 28)
    calibrate(m, [x], progress=False)
    low = lower(copy.deepcopy(m), backend, warn=False)
    blocks = lowering_report(low)["blocks"]
    assert blocks
    for b in low.modules():
        if type(b).__name__ == "Int8Block":
            assert isinstance(b.ln1, LayerNormRowQuant) and isinstance(b.ln2, LayerNormRowQuant)
            assert b.attn.qkv_codes is not None
            # attn·v as int32 rows for proj's per-token grids, where the native kernels run
            assert b.attn.av_rows == (native.available() and b.attn.av.method == "vnni")
    with torch.no_grad():
        y_fq, y = m(x), low(x)
    assert float(torch.nn.functional.cosine_similarity(y.flatten(), y_fq.flatten(), 0)) > 0.9999


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_attn_v_rows_round_their_ties_as_the_fake_quant(backend: str, symmetric: bool) -> None:
    """attn·v of 4-bit codes lies on a lattice, and a per-token grid for ``proj`` is built from
    one of its points, so ``x / s`` falls exactly on rounding midpoints; the runtime's codes
    of the int32 sums (``row_codes(acc, mul=s_p * s_v)``) equal the fake quant's at every one,
    since ``QuantMatMul`` rounds its product as the runtime does."""
    from vitquant.quant import QuantMatMul
    from vitquant.quant.quantizers import UniformQuantizer

    lin, _ = _linear(symmetric, bits=4)
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(3 * torch.randn(2, 3, 50, 50, generator=g), -1)
    v = torch.randn(2, 3, 50, 16, generator=g)
    av = QuantMatMul("av")
    av.a_quantizer, av.b_quantizer = UniformQuantizer(4, signed=False), UniformQuantizer(4)
    av.a_quantizer.calibrate_tensor(p, "max")
    av.b_quantizer.calibrate_tensor(v, "max")
    with torch.no_grad():
        o = av(p, v).transpose(1, 2).reshape(2, 50, 48)
        s, z = lin.input_quantizer._grid(o)
        want = lin.input_quantizer.int_codes(o).reshape(100, 48)
    frac = torch.frac((o / s).abs())
    assert ((frac - 0.5).abs() < 1e-6).float().mean() > 0.01  # exact ties are common here
    pc, vc = av.a_quantizer.int_codes(p).long(), av.b_quantizer.int_codes(v).long()
    acc = (pc @ vc).transpose(1, 2).reshape(100, 48).to(torch.int32)
    low, why = DynamicInt8Linear.from_quant(lin, backend)
    assert low is not None, why
    mul = float(av.a_quantizer.scale) * float(av.b_quantizer.scale)
    got = low.row_codes(acc, (2, 50), mul=mul).codes.to(torch.int32) - low.offset
    assert torch.equal(got, want.to(torch.int32))

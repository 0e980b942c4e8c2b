"""vitquant.runtime.rows: the native row-wise kernels (LayerNorm-and-quantize, per-token
quantization, the epilogue of a GEMM on per-token codes).

Checked against the torch ops they replace: ATen's LayerNorm then rounding, the fake quantizer's
per-token grid (:func:`vitquant.quant.primitives.token_qparams`) and ``sub_``/``mul_``/``add_``
chains, bit-exact where the kernel promises it, on rows with tails, strides and zeros.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitquant.errors import ConfigError
from vitquant.quant import primitives as P
from vitquant.runtime import native, rows
from vitquant.runtime.dynamic import DynAct

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.why_unavailable()}"
)


def _ln_codes(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, lo: int, hi: int
) -> torch.Tensor:
    """ATen's LayerNorm (float32 statistics), then round half to even and saturate."""
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), w, b, eps)
    return torch.round(y).clamp(lo, hi)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 17), (2, 197, 64), (1, 197, 384), (2, 7, 200)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype,lo,hi,zp", [(torch.uint8, 0, 255, 128.0),
                                            (torch.int8, -128, 127, 0.0),
                                            (torch.int8, -7, 7, 0.0)])  # fmt: skip
def test_layernorm_quant_matches_layer_norm_then_round(
    shape: tuple[int, ...], x_dtype: torch.dtype, dtype: torch.dtype, lo: int, hi: int, zp: float
) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    c = shape[-1]
    x = (torch.randn(*shape, generator=gen) * 3 + 1).to(x_dtype)
    x[..., 0] *= 40  # an outlier channel: the statistics see it, the codes saturate
    w = torch.randn(c, generator=gen) * 20
    b = torch.randn(c, generator=gen) * 5 + zp
    got = rows.layernorm_quant(x, w, b, 1e-6, lo, hi, dtype)
    assert got.dtype == dtype and got.shape == x.shape
    want = _ln_codes(x, w, b, 1e-6, lo, hi)
    diff = (got.int() - want.int()).abs()
    # float32 statistics summed in another order: one step at most, only at rounding midpoints
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert got.min() >= lo and got.max() <= hi


def test_layernorm_quant_reads_strided_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 96, generator=gen)[:, ::2]  # rows of contiguous elements, row gaps
    w, b = torch.randn(96, generator=gen) * 10, torch.full((96,), 128.0)
    got = rows.layernorm_quant(x, w, b, 1e-5, 0, 255, torch.uint8)
    assert torch.equal(got.int(), _ln_codes(x, w, b, 1e-5, 0, 255).int())
    with pytest.raises(ConfigError, match="do not fit"):
        rows.layernorm_quant(x, w, b, 1e-5, 0, 255, torch.int8)
    with pytest.raises(ConfigError, match="weight/bias"):
        rows.layernorm_quant(x, w[:5], b, 1e-5, 0, 255, torch.uint8)
    with pytest.raises(ConfigError, match="float32"):
        rows.layernorm_quant(x.double(), w, b, 1e-5, 0, 255, torch.uint8)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("bits", "narrow", "clip"), [(8, False, 1.0), (8, True, 0.9), (4, False, 0.8)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_row_quant_is_bit_exact_with_the_torch_ops(
    symmetric: bool, bits: int, narrow: bool, clip: float, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 2 * 37, generator=g) * torch.exp(2 * torch.randn(50, 1, generator=g))
    x[7] = 0.0  # an all-zero row
    x[9] = x[9].abs()  # a row without negative values
    x = x.to(dtype)[:, ::2]  # strided rows of 37 (a tail of 5 after two vectors)
    signed = symmetric
    qmin, qmax = P.qrange(bits, signed, narrow)
    act = DynAct(bits, signed, symmetric, narrow, clip, qmin, qmax)
    s_ref, z_ref = act.grid(x.float())
    q_ref = torch.clamp(torch.round(x.float() / s_ref) + z_ref, qmin, qmax)
    off = 128 if signed else 0
    qdiv = qmax if symmetric else 2**bits - 1  # written out: the test checks DynAct.qdiv
    assert act.qdiv == qdiv
    codes, s, z = rows.row_quant(x, qmin, qmax, off, symmetric, qdiv, clip, torch.uint8)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    assert torch.equal(codes.int() - off, q_ref.int())


def test_native_row_quant_refuses_bad_operands() -> None:

    with pytest.raises(ConfigError, match="do not fit"):
        rows.row_quant(torch.randn(2, 4), -128, 127, 0, True, 127, 1.0, torch.uint8)
    with pytest.raises(ConfigError, match="float32"):
        rows.row_quant(torch.randn(2, 4).double(), 0, 255, 0, False, 255, 1.0, torch.uint8)


def _act(symmetric: bool, bits: int = 8, narrow: bool = False, clip: float = 1.0) -> DynAct:
    qmin, qmax = P.qrange(bits, symmetric, narrow)
    return DynAct(bits, symmetric, symmetric, narrow, clip, qmin, qmax)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [37, 384])
def test_layernorm_row_quant_is_row_quant_of_the_layer_norm(
    symmetric: bool, x_dtype: torch.dtype, c: int
) -> None:
    g = torch.Generator().manual_seed(c)
    x = (torch.randn(2, 60, 2 * c, generator=g) * 3 + 1).to(x_dtype)[..., ::2]  # strided rows
    x[0, 3, 5] = 200.0  # an outlier token channel: its row's grid widens, the others' do not
    w = torch.randn(c, generator=g) * 2
    w[7] = 30.0  # a post-LN outlier channel
    b = torch.randn(c, generator=g)
    a = _act(symmetric, clip=0.9)
    off = 128 if symmetric else 0
    codes, s, z = rows.layernorm_row_quant(
        x, w, b, 1e-6, a.qmin, a.qmax, off, symmetric, a.qdiv, a.clip, torch.uint8
    )
    y = F.layer_norm(x.float(), (c,), w, b, 1e-6).reshape(-1, c)
    want, s_ref, z_ref = rows.row_quant(
        y, a.qmin, a.qmax, off, symmetric, a.qdiv, a.clip, torch.uint8
    )
    assert codes.shape == (120, c) and s.shape == z.shape == (120, 1)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert (z - z_ref).abs().max() <= 1
    diff = (codes.int() - want.int()).abs()
    # the LayerNorm's float rounding differs from ATen's: one step at most, rarely
    assert diff.max() <= 1 and (diff > 0).float().mean() < 2e-3


def _epilogue_ref(y, s, z, ws, b, r):  # noqa: ANN001, ANN202
    """The torch ops the epilogue replaces, in DynamicInt8Linear's order."""
    t = y.clone()
    if z is not None:
        t = t.sub_(z * ws)
    t = t.mul_(s)
    if b is not None:
        t = t.add_(b)
    return t if r is None else t + r


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("residual", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_row_epilogue_is_bit_exact_with_the_torch_ops(
    asym: bool, with_bias: bool, residual: torch.dtype | None, out_dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(5)
    m, n = 33, 53  # a tail of 5 columns
    y = torch.randn(m, n, generator=g) * 100
    s = torch.rand(m, 1, generator=g) * 0.05 + 1e-3
    z = torch.randint(0, 255, (m, 1), generator=g).float() if asym else None
    ws = torch.randn(n, generator=g) if asym else None
    b = torch.randn(n, generator=g) if with_bias else None
    r = None if residual is None else torch.randn(m, n, generator=g).to(residual)
    want = _epilogue_ref(y, s, z, ws, b, r).to(out_dtype)
    got = rows.row_epilogue(
        y.clone(), s, zero_point=z, wsum=ws, bias=b, other=r, out_dtype=out_dtype
    )
    assert got.dtype == out_dtype and torch.equal(got, want)


@pytest.mark.parametrize(("dtype", "lo", "hi"), [(torch.int8, -127, 127), (torch.uint8, 0, 255),
                                                 (torch.int8, -7, 7)])  # fmt: skip
def test_row_epilogue_codes_round_half_to_even_and_saturate(
    dtype: torch.dtype, lo: int, hi: int
) -> None:
    g = torch.Generator().manual_seed(6)
    y = torch.randn(20, 70, generator=g) * 60
    y[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1e9, -1e9, 0.0])  # midpoints, saturation
    s = torch.ones(20, 1)
    b = torch.full((70,), 128.0 if dtype == torch.uint8 else 0.0)
    got = rows.row_epilogue(y.clone(), s, bias=b, out_dtype=dtype, lo=lo, hi=hi)
    want = torch.round(_epilogue_ref(y, s, None, None, b, None)).clamp(lo, hi)
    assert got.dtype == dtype and torch.equal(got.int(), want.int())


def test_row_epilogue_refuses_bad_operands() -> None:
    y, s = torch.randn(4, 8), torch.ones(4, 1)
    with pytest.raises(ConfigError, match="float32 CPU matrix"):
        rows.row_epilogue(y.double(), s)
    with pytest.raises(ConfigError, match="zero point needs wsum"):
        rows.row_epilogue(y, s, zero_point=torch.zeros(4, 1))
    with pytest.raises(ConfigError, match="8 values expected"):
        rows.row_epilogue(y, s, bias=torch.zeros(7))
    with pytest.raises(ConfigError, match="4x8"):
        rows.row_epilogue(y, s, other=torch.zeros(3, 8))
    with pytest.raises(ConfigError, match="do not fit"):
        rows.row_epilogue(y, s, out_dtype=torch.int8, lo=0, hi=255)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("smooth", [False, True])
def test_row_epilogue_gelu_quant_is_row_quant_of_torch_gelu(symmetric: bool, smooth: bool) -> None:
    g = torch.Generator().manual_seed(7)
    m, n = 40, 200  # a tail of 8 columns
    y = torch.randn(m, n, generator=g) * 300
    s = torch.rand(m, 1, generator=g) * 0.01 + 1e-3
    z = None if symmetric else torch.randint(0, 255, (m, 1), generator=g).float()
    ws = None if symmetric else torch.randn(n, generator=g) * 0.1
    b = torch.randn(n, generator=g)
    d = torch.exp(torch.randn(n, generator=g)) if smooth else None
    a = _act(symmetric)
    off = 128 if symmetric else 0
    hidden = F.gelu(_epilogue_ref(y, s, z, ws, b, None))
    if d is not None:
        hidden = hidden / d
    want, s_ref, z_ref = rows.row_quant(
        hidden, a.qmin, a.qmax, off, symmetric, a.qdiv, a.clip, torch.uint8
    )
    y_got = y.clone()
    codes, s2, z2 = rows.row_epilogue_gelu_quant(
        y_got, s, zero_point=z, wsum=ws, bias=b, div=d, qmin=a.qmin, qmax=a.qmax, offset=off,
        symmetric=symmetric, qdiv=a.qdiv, clip=a.clip, dtype=torch.uint8,
    )  # fmt: skip
    # the hidden activation left in y: torch's GELU up to its exponential's last bits (which
    # 1 + erf(u) magnifies where erf(u) is near -1, i.e. for GELU values near 0)
    atol = 2e-6 / (1.0 if d is None else float(d.min()))
    torch.testing.assert_close(y_got, hidden, rtol=1e-6, atol=atol)
    torch.testing.assert_close(s2, s_ref, rtol=1e-6, atol=0)
    diff = (codes.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    with pytest.raises(ConfigError, match="contiguous float32"):
        rows.row_epilogue_gelu_quant(
            y.t(), s, qmin=0, qmax=255, offset=0, symmetric=False, qdiv=255, clip=1.0,
            dtype=torch.uint8,
        )  # fmt: skip


@pytest.mark.parametrize("symmetric", [True, False])
def test_row_quant_of_int32_products_is_that_of_their_float_values(symmetric: bool) -> None:
    """int32 rows (attn·v products) with a multiplier: the codes of ``torch.mul(x, mul)``."""
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-(2**20), 2**20, (30, 2 * 70), generator=g, dtype=torch.int32)[:, ::2]
    a = _act(symmetric)
    off, mul = (128 if symmetric else 0), 3.7e-5
    got = rows.row_quant(x, a.qmin, a.qmax, off, symmetric, a.qdiv, a.clip, torch.uint8, mul=mul)
    want = rows.row_quant(
        torch.mul(x, mul).float(), a.qmin, a.qmax, off, symmetric, a.qdiv, a.clip, torch.uint8
    )
    for g_, w_ in zip(got, want, strict=True):
        assert torch.equal(g_, w_)

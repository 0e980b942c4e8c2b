"""Quantization primitives against torch's own fake-quant ops and numpy re-derivations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitquant.errors import ConfigError
from vitquant.quant.primitives import (
    check_bits,
    dequantize,
    expand_to,
    fake_quant,
    fake_quant_ste,
    floor_ste,
    grad_scale,
    integer_matmul,
    product_bound,
    qparams_from_minmax,
    qrange,
    quantize,
    round_ste,
    scale_from_amax,
)

BITS = [2, 3, 4, 5, 6, 8, 16]


def _x(n=4096, spread=3.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * spread


def test_qrange_matches_integer_dtypes():
    assert qrange(8) == (torch.iinfo(torch.int8).min, torch.iinfo(torch.int8).max)
    assert qrange(16) == (torch.iinfo(torch.int16).min, torch.iinfo(torch.int16).max)
    assert qrange(8, signed=False) == (0, torch.iinfo(torch.uint8).max)
    assert qrange(8, narrow=True) == (-127, 127)
    assert qrange(8, signed=False, narrow=True) == (0, 254)
    for b in range(1, 17):
        lo, hi = qrange(b)
        assert hi - lo + 1 == 2**b and lo == -(2 ** (b - 1))
        assert qrange(b, signed=False) == (0, 2**b - 1)


def test_check_bits():
    assert check_bits(4) == 4 and check_bits(4.0) == 4
    for bad in (1, 0, 17, -3, 2.5, True):
        with pytest.raises(ConfigError, match="bits"):
            check_bits(bad)
    with pytest.raises(ConfigError, match="wbits"):
        check_bits(9, 2, 8, what="wbits")


def _grids():
    for bits in BITS:
        for signed in (True, False):
            for narrow in (False, True):
                yield bits, signed, narrow


@pytest.mark.parametrize("bits,signed,narrow", list(_grids()))
def test_fake_quant_per_tensor_vs_torch(bits, signed, narrow):
    qmin, qmax = qrange(bits, signed, narrow)
    x = _x(spread=3.0).requires_grad_()
    # power-of-two scales: x / s and torch's x * (1 / s) are then the same number
    scale = 2.0 ** (2 - bits)
    zp = 0 if signed else (qmax + 1) // 3
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    out = fake_quant(x, torch.tensor(scale), zp, qmin, qmax)
    assert torch.equal(out, ref)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    (g_out,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g_out, g_ref)
    assert 0 < g_out.sum() < x.numel() or bits == 16  # both clipped and unclipped elements


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_arbitrary_scale_vs_torch(bits):
    qmin, qmax = qrange(bits)
    x = _x(20_000)
    scale = 0.0371
    ref = torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)
    out = fake_quant(x, torch.tensor(scale), 0, qmin, qmax)
    # x / s vs x * (1 / s) may round differently exactly at a half step: one level, rarely
    diff = (out - ref).abs()
    assert diff.max() <= scale * 1.0001 and (diff > 0).sum() <= 5


@pytest.mark.parametrize("bits,signed", [(4, True), (8, True), (8, False), (16, True)])
@pytest.mark.parametrize("axis", [0, 1])
def test_fake_quant_per_channel_vs_torch(bits, signed, axis):
    qmin, qmax = qrange(bits, signed)
    x = torch.randn(6, 10) * torch.linspace(0.5, 4, 10)
    x = x.T.contiguous() if axis == 0 else x
    x.requires_grad_()
    n = x.shape[axis]
    scale = 2.0 ** torch.randint(-6, 0, (n,)).float()
    zp = torch.zeros(n, dtype=torch.int32) if signed else torch.randint(0, qmax // 2, (n,))
    zp = zp.int()
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    out = fake_quant(x, expand_to(scale, x, axis), expand_to(zp.float(), x, axis), qmin, qmax)
    assert torch.equal(out, ref)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    (g_out,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g_out, g_ref)


def _lsq_factor(numel: int, qmax: int) -> float:
    return 1.0 / math.sqrt(numel * qmax)


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (8, True), (4, False), (8, False)])
@pytest.mark.parametrize("lsq", [False, True])
def test_fake_quant_ste_vs_torch_learnable_per_tensor(bits, signed, lsq):
    qmin, qmax = qrange(bits, signed)
    x = _x(2048, spread=2.0)
    g = _lsq_factor(x.numel(), qmax) if lsq else 1.0
    scale0 = 2.0 ** (1 - bits)
    zp0 = 0.0 if signed else float(qmax // 4)
    # reference
    xr = x.clone().requires_grad_()
    sr = torch.tensor([scale0], requires_grad=True)
    zr = torch.tensor([zp0], requires_grad=True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(xr, sr, zr, qmin, qmax, g)
    w = torch.randn_like(x)  # a non-trivial upstream gradient
    (ref * w).sum().backward()
    # ours
    xo = x.clone().requires_grad_()
    so = torch.tensor(scale0, requires_grad=True)
    zo = torch.tensor(zp0, requires_grad=True)
    out = fake_quant_ste(xo, grad_scale(so, g), grad_scale(zo, g), qmin, qmax)
    (out * w).sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(xo.grad, xr.grad)
    torch.testing.assert_close(so.grad.reshape(1), sr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zo.grad.reshape(1), zr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lsq", [False, True])
def test_fake_quant_ste_vs_torch_learnable_per_channel(lsq):
    qmin, qmax = qrange(4)
    x = torch.randn(8, 32) * torch.linspace(0.2, 3, 8)[:, None]
    g = _lsq_factor(x.numel() // 8, qmax) if lsq else 1.0
    scale0 = 2.0 ** torch.randint(-4, 0, (8,)).float()
    zp0 = torch.zeros(8)
    xr, sr, zr = (t.clone().requires_grad_() for t in (x, scale0, zp0))
    ref = torch._fake_quantize_learnable_per_channel_affine(xr, sr, zr, 0, qmin, qmax, g)
    w = torch.randn_like(x)
    (ref * w).sum().backward()
    xo, so, zo = (t.clone().requires_grad_() for t in (x, scale0, zp0))
    out = fake_quant_ste(
        xo, expand_to(grad_scale(so, g), x, 0), expand_to(grad_scale(zo, g), x, 0), qmin, qmax
    )
    (out * w).sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(xo.grad, xr.grad)
    # sums of 32 terms with cancellation: allow summation-order differences
    torch.testing.assert_close(so.grad, sr.grad, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(zo.grad, zr.grad, rtol=1e-5, atol=2e-5)


def test_round_floor_ste_and_grad_scale():
    x = torch.tensor([0.4, 1.5, 2.5, -1.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))
    x.grad = None
    floor_ste(x).mul(torch.arange(4.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(4.0))
    s = torch.tensor(2.0, requires_grad=True)
    z = grad_scale(s, 0.25)
    assert float(z.detach()) == 2.0
    (z * 3).backward()
    assert float(s.grad) == 0.75


def test_scale_from_amax():
    amax = torch.tensor([1.27, 0.0, 2.55])
    s = scale_from_amax(amax, 8)
    torch.testing.assert_close(s[[0, 2]], amax[[0, 2]] / 127)
    assert s[1] > 0  # clamped, no division by zero downstream
    torch.testing.assert_close(scale_from_amax(amax, 8, signed=False)[2], torch.tensor(0.01))


@pytest.mark.parametrize("bits", [4, 8])
def test_qparams_from_minmax_vs_torch_observer(bits):
    from torch.ao.quantization.observer import MinMaxObserver

    qmin, qmax = qrange(bits, signed=False)
    for lo, hi in [(-1.3, 2.7), (0.5, 3.0), (-4.0, -0.25), (-0.01, 5.0)]:
        obs = MinMaxObserver(
            dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=qmin, quant_max=qmax
        )
        obs(torch.tensor([lo, hi]))
        s_ref, z_ref = obs.calculate_qparams()
        s, z = qparams_from_minmax(torch.tensor(lo), torch.tensor(hi), bits)
        torch.testing.assert_close(s, s_ref[0], rtol=1e-6, atol=0)
        assert int(z) == int(z_ref[0])
        # zero is exactly representable
        assert float(dequantize(quantize(torch.tensor(0.0), s, z, qmin, qmax), s, z)) == 0.0


def test_quantize_dequantize_round_trip():
    qmin, qmax = qrange(8)
    s = torch.tensor(0.05)
    q = torch.arange(qmin, qmax + 1).float()
    assert torch.equal(quantize(dequantize(q, s), s, 0, qmin, qmax), q)
    q8 = quantize(q * s, s, 0, qmin, qmax, dtype=torch.int8)
    assert q8.dtype == torch.int8 and torch.equal(q8.float(), q)
    x = torch.rand(1000) * 12 - 6
    err = (dequantize(quantize(x, s, 0, qmin, qmax), s) - x).abs()
    assert err.max() <= s / 2 + 1e-6


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    log_scale=st.integers(-8, 2),  # power-of-two steps: the grid check is exact
    values=st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=64),
)
def test_fake_quant_properties(bits, signed, log_scale, values):
    qmin, qmax = qrange(bits, signed)
    s = torch.tensor(2.0**log_scale)
    x = torch.tensor(values)
    y = fake_quant(x, s, 0, qmin, qmax)
    # on the grid, inside the range, idempotent
    k = y / s
    assert torch.equal(k, torch.round(k))
    assert (k >= qmin).all() and (k <= qmax).all()
    assert torch.equal(fake_quant(y, s, 0, qmin, qmax), y)
    # error at most half a step inside the range; clipped to the nearest end outside
    inside = (x >= qmin * s) & (x <= qmax * s)
    assert ((y - x).abs()[inside] <= s / 2 * (1 + 1e-6)).all()
    assert torch.equal(y[x > qmax * s], (qmax * s).expand_as(y[x > qmax * s]))
    # the same as quantize + dequantize
    assert torch.equal(y, dequantize(quantize(x, s, 0, qmin, qmax), s))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 16), signed=st.booleans(), narrow=st.booleans())
def test_qrange_properties(bits, signed, narrow):
    lo, hi = qrange(bits, signed, narrow)
    assert hi - lo + 1 == 2**bits - int(narrow)
    assert (lo < 0) == signed and (lo == -hi) == (signed and narrow)


def test_expand_to():
    x = torch.zeros(2, 3, 4)
    assert expand_to(torch.ones(3), x, 1).shape == (1, 3, 1)
    assert expand_to(torch.ones(4), x, -1).shape == (1, 1, 4)
    t = torch.ones(())
    assert expand_to(t, x, None) is t and expand_to(t, x, 0) is t
    assert np.array_equal(expand_to(torch.arange(2.0), x, 0).reshape(-1).numpy(), [0.0, 1.0])


@pytest.mark.parametrize("bits,k", [(4, 197), (8, 197), (8, 2048)])
def test_integer_matmul_is_the_exact_integer_sum_rounded_once(bits, k):
    """numpy's int64 sum cast to float32 (as int32 accumulators are), times the scale rounded
    to float32; independent of the summation order, unlike the sum of dequantized floats. At
    K=2048 the bound passes 2**24 and the sum runs in float64."""
    g = torch.Generator().manual_seed(bits + k)
    lo, hi = qrange(bits, signed=True)
    a = torch.randint(0, 2 * hi + 1, (3, 5, k), generator=g).float()  # unsigned codes
    b = torch.randint(lo, hi + 1, (3, k, 7), generator=g).float()
    scale = torch.tensor(0.0123, dtype=torch.float64) * torch.tensor(0.731, dtype=torch.float64)
    bound = k * (2 * hi) * (hi - lo)
    exact = np.matmul(a.numpy().astype(np.int64), b.numpy().astype(np.int64))
    want = exact.astype(np.float32) * np.float32(scale.item())
    got = integer_matmul(a, b, scale, bound)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
    perm = torch.randperm(k, generator=g)  # another summation order: the same bits
    assert torch.equal(integer_matmul(a[..., perm], b[:, perm], scale, bound), got)
    if k == 2048:  # float64 operands: the sum and the scale stay in float64
        assert bound >= 2**24
        assert torch.equal(
            integer_matmul(a.double(), b.double(), scale, bound).float(),
            torch.from_numpy(exact.astype(np.float64) * scale.item()).float(),
        )


def _int64_product(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    exact = np.matmul(a.numpy().astype(np.int64), b.numpy().astype(np.int64))
    return exact.astype(np.float32) * np.float32(scale.item())


def test_product_bound_bounds_every_entry_and_tightens_the_grid_bound():
    """Softmax-like rows (8-bit probabilities summing to about 255) times 8-bit ``v`` at 577
    tokens: the grids' bound passes 2**24, the data's stays far below, and it bounds
    ``|a| @ |b|`` entry by entry; so the sum runs in float32 and is still the exact one."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(2, 3, 577, 577, generator=g), -1)
    a = torch.round(p * 255)
    b = torch.randint(-128, 128, (2, 3, 577, 64), generator=g).float()
    grid_bound = 577 * 255 * 255
    got = product_bound(a, b)
    assert (a.abs() @ b.abs()).amax().item() <= got < 2**24 <= grid_bound
    scale = torch.tensor(1 / 255, dtype=torch.float64) * torch.tensor(0.02, dtype=torch.float64)
    for bound in (None, grid_bound):
        assert np.array_equal(
            integer_matmul(a, b, scale, bound).numpy(), _int64_product(a, b, scale)
        )
    c = torch.randint(0, 256, (4, 9), generator=g).float()  # the column-sum side is the smaller
    d = torch.zeros(9, 5)
    d[0] = 200.0
    assert (c.abs() @ d.abs()).amax().item() <= product_bound(c, d) == c.amax().item() * 200


def test_integer_matmul_without_a_bound_sums_large_codes_exactly():
    """Non-negative 8-bit codes at K=2048: a float32 sum rounds (shown), the data's bound
    passes 2**24, and the product is still numpy's exact int64 sum."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (4, 2048), generator=g).float()
    b = torch.randint(1, 128, (2048, 6), generator=g).float()
    scale = torch.tensor(0.5, dtype=torch.float64)
    want = _int64_product(a, b, scale)
    assert product_bound(a, b) >= 2**24
    assert not np.array_equal((a @ b).numpy() * np.float32(0.5), want)
    assert np.array_equal(integer_matmul(a, b, scale).numpy(), want)

"""Log-√2 attention probabilities (RepQ-ViT's grid) on the native kernels: the codes of
``native.qk_softmax_log2`` against ``torch.softmax`` then ``primitives.log2_quantize``, its two
integer products against the dequantized float product, and a lowered model whose attention
takes that path against its fake-quant model and against the fallback (attention kept in the
fake quant's float)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import digits_tensors, trained_nano
from vitquant.errors import ConfigError
from vitquant.quant import QuantConfig, calibrate, prepare
from vitquant.quant import primitives as P
from vitquant.runtime import Int8Block, lower, native

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.why_unavailable()}"
)


def _codes(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)


def _decode(pair: torch.Tensor, bits: int) -> torch.Tensor:
    """The log-√2 codes ``q`` back from the kernel's (-even, -odd) integer pair."""
    qmax, m0 = 2**bits - 1, (2**bits - 2) // 2
    even, odd = pair[0].int(), pair[1].int()
    assert not ((even != 0) & (odd != 0)).any() and (even <= 0).all() and (odd <= 0).all()
    mag = -(even + odd)
    nonzero = mag > 0
    m = m0 - torch.log2(mag.clamp(min=1).float()).round().int()
    assert torch.equal(2 ** (m0 - m)[nonzero], mag[nonzero])  # powers of two
    return torch.where(nonzero, 2 * m + (odd != 0).int(), torch.full_like(m, qmax))


@needs_native
@pytest.mark.parametrize("n,alpha,scale,bits", [(197, 2e-4, 0.05, 4), (33, 1e-3, 0.3, 4),
                                                (5, 3e-4, 1.0, 3), (64, 0.0, 0.02, 4)])  # fmt: skip
def test_codes_are_softmax_then_log2_quantize(
    n: int, alpha: float, scale: float, bits: int
) -> None:
    gen = torch.Generator().manual_seed(n)
    q, k = _codes(2, 3, n, 64, gen=gen), _codes(2, 3, n, 64, gen=gen)
    got = native.qk_softmax_log2(q, k.transpose(-2, -1), alpha, scale, bits)
    assert got.shape == (2, 2, 3, n, n) and got.dtype == torch.int8
    p = torch.softmax((q.long() @ k.long().transpose(-2, -1)).float() * alpha, -1)
    want = P.log2_quantize(p, torch.tensor(scale), bits, sqrt2=True).int()
    codes = _decode(got, bits)
    assert alpha == 0 or len(want.unique()) > 2  # the grid is exercised, not one code
    diff = (codes - want).abs()
    # the exponential differs from torch's by an ulp or two: one step, at rounding boundaries
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    v = _codes(2, 3, n, 64, gen=gen)
    m0 = (2**bits - 2) // 2
    even, odd = (got[i].long() @ v.long() for i in (0, 1))
    prod = -(even.double() + odd.double() / math.sqrt(2)) * scale * 2.0**-m0
    ref = P.log2_dequantize(codes, torch.tensor(scale), bits, sqrt2=True).double() @ v.double()
    assert (prod - ref).norm() <= 1e-6 * ref.norm()  # (ref's values are float32-rounded)


@needs_native
def test_bad_grid_is_refused() -> None:
    gen = torch.Generator().manual_seed(0)
    q = _codes(1, 1, 4, 8, gen=gen)
    with pytest.raises(ConfigError, match="bits"):
        native.qk_softmax_log2(q, q.transpose(-2, -1), 0.01, 0.5, 5)


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor]:
    x, y = digits_tensors()
    return trained_nano(x, y), x[:256]


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_lowered_log2_attention_is_native_and_matches_the_fake_quant(
    trained: tuple[torch.nn.Module, torch.Tensor], bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = trained
    cfg = QuantConfig("ft1", bits, bits, softmax_quantizer="log2_sqrt2", softmax_bits=4)
    q = calibrate(prepare(copy.deepcopy(model), cfg), [x[:128]], progress=False)
    low = lower(copy.deepcopy(q), warn=False)
    attns = [b.attn for b in low.modules() if isinstance(b, Int8Block)]
    assert attns and all(a.log2_codes is not None for a in attns)
    calls: list[int] = []
    kernel = native.qk_softmax_log2
    monkeypatch.setattr(native, "qk_softmax_log2", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        ref, got = q(x), low(x)
        assert len(calls) == len(attns)  # every block's attention took the native kernel
        for a in attns:  # the fallback: attention in the fake quant's float
            a.log2_codes = None
        slow = low(x)
    cos = F.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999 and (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.98
    # the integer path and the fallback compute one function, up to float rounding
    assert len(calls) == len(attns)  # (the fallback did not call the kernel)
    assert F.cosine_similarity(got.flatten(), slow.flatten(), dim=0) > 0.9999


@needs_native
def test_compiled_log2_model_matches_eager(trained: tuple[torch.nn.Module, torch.Tensor]) -> None:
    """Under ``torch.compile`` the attention takes the unfused path (the log-√2 kernel is called
    eagerly only); the compiled model computes the same function."""
    model, x = trained
    cfg = QuantConfig("ft1", 8, 8, softmax_quantizer="log2_sqrt2", softmax_bits=4)
    q = calibrate(prepare(copy.deepcopy(model), cfg), [x[:128]], progress=False)
    low = lower(q, warn=False)
    with torch.no_grad():
        eager, compiled = low(x[:64]), torch.compile(low)(x[:64])
    assert F.cosine_similarity(eager.flatten(), compiled.flatten(), dim=0) > 0.9999

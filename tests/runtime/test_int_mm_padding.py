"""Padding for CUDA's ``torch._int_mm`` and the batched attention matmul, checked on the CPU.

The reference everywhere is the int64 matmul of the same codes. Shapes are the awkward ones of a
224-pixel ViT (197 tokens, 64-dim heads) and smaller odd ones.
"""

from __future__ import annotations

import pytest
import torch

from vitquant.errors import ConfigError
from vitquant.runtime.kernels import (
    exact_float_chunk,
    int8_bmm,
    int_bmm,
    int_mm,
    int_mm_padding,
    pad_int_operands,
)

SHAPES = [(197, 64, 197), (197, 197, 64), (5, 3, 10), (1, 1, 1), (17, 8, 8), (40, 24, 16)]


def _codes(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_padded_shapes_follow_int_mm_rules(m: int, k: int, n: int) -> None:
    pm, pk, pn = int_mm_padding(m, k, n)
    assert pk % 8 == 0 and pn % 8 == 0 and pk >= max(k, 16) and pn >= max(n, 16)
    assert pm > 16 and pm >= m
    assert pm == m or (m <= 16 and pm % 8 == 0)  # rows are only padded when there are too few
    a, b = pad_int_operands(
        torch.zeros(m, k, dtype=torch.int8), torch.zeros(k, n, dtype=torch.int8)
    )
    assert a.shape == (pm, pk) and b.shape == (pk, pn)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_padded_product_is_exact(m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k)
    a, b = _codes(m, k, gen=gen), _codes(k, n, gen=gen)
    ref = a.long() @ b.long()
    ap, bp = pad_int_operands(a, b)
    assert torch.equal((ap.long() @ bp.long())[:m, :n], ref)
    assert torch.count_nonzero(ap[m:]) == 0 and torch.count_nonzero(bp[:, n:]) == 0
    got = int_mm(a, b, pad=True)  # the padded torch._int_mm path, here on the CPU kernel
    assert got.dtype == torch.int32 and torch.equal(got.long(), ref)
    # a transposed (column-major) right operand, as the packed weights and kᵀ are
    bt = b.t().contiguous().t()
    out = torch.empty(m, n, dtype=torch.int32)
    assert torch.equal(int_mm(a, bt, out=out, pad=True).long(), ref)
    assert torch.equal(out.long(), ref)


def test_padding_refuses_empty_shapes() -> None:
    with pytest.raises(ConfigError, match="empty"):
        int_mm_padding(0, 8, 8)


@pytest.mark.parametrize("method,pad", [("batched", None), ("loop", True), ("loop", False)])
@pytest.mark.parametrize(
    "a_shape,b_shape",
    [
        ((2, 3, 197, 64), (2, 3, 64, 197)),
        ((2, 3, 197, 197), (2, 3, 197, 64)),
        ((3, 5, 7), (7, 9)),
        ((197, 64), (64, 197)),
    ],
)
def test_int_bmm_matches_int64(method: str, pad: bool | None, a_shape, b_shape) -> None:
    gen = torch.Generator().manual_seed(7)
    a, b = _codes(*a_shape, gen=gen), _codes(*b_shape, gen=gen)
    got = int_bmm(a, b, method=method, pad=pad)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), a.long() @ b.long())


def test_batched_float_product_is_exact_beyond_one_chunk() -> None:
    """Inner sizes past float32's exact range are summed in exact chunks."""
    k = exact_float_chunk() + 477
    assert exact_float_chunk() == 1024
    a = torch.full((1, 2, 3, k), 127, dtype=torch.int8)
    b = torch.full((1, 2, k, 5), 127, dtype=torch.int8)
    a[..., 1::7] = 125
    b[..., ::5, :] = 121
    ref = a.long() @ b.long()
    # an odd number of odd products: odd sums above 2^24, which float32 cannot hold, so one
    # float32 matmul over the whole inner size is wrong here and chunking is needed
    assert bool((ref > 2**24).all()) and bool((ref % 2 == 1).all())
    assert not torch.equal((a.float() @ b.float()).long(), ref)
    assert torch.equal(int_bmm(a, b, method="batched").long(), ref)


@pytest.mark.parametrize("method", ["batched", "loop"])
@pytest.mark.parametrize("zps", [(0, 0), (-128, 3), (5, -2)])
def test_int8_bmm_with_zero_points_on_attention_shapes(method: str, zps: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(3)
    p = _codes(2, 3, 197, 197, gen=gen)
    v = _codes(2, 3, 197, 64, gen=gen)
    got = int8_bmm(p, zps[0], v, zps[1], "intmm", method=method)
    assert torch.equal(got.long(), (p.long() - zps[0]) @ (v.long() - zps[1]))
    q, kt = _codes(2, 3, 197, 64, gen=gen), _codes(2, 3, 197, 64, gen=gen).transpose(-2, -1)
    got = int8_bmm(q, 0, kt, 0, "intmm", method=method)
    assert torch.equal(got.long(), q.long() @ kt.long())


def test_unknown_method_refused() -> None:
    a = torch.zeros(2, 4, 4, dtype=torch.int8)
    with pytest.raises(ConfigError, match="batched, vnni or loop"):
        int_bmm(a, a, method="cublas")


@pytest.mark.gpu
def test_cuda_paths_match_int64() -> None:
    gen = torch.Generator().manual_seed(11)
    for m, k, n in SHAPES:
        a, b = _codes(m, k, gen=gen), _codes(k, n, gen=gen)
        got = int_mm(a.cuda(), b.cuda())
        assert torch.equal(got.cpu().long(), a.long() @ b.long())
    p, v = _codes(4, 6, 197, 197, gen=gen), _codes(4, 6, 197, 64, gen=gen)
    got = int8_bmm(p.cuda(), -128, v.cuda(), 0, "intmm")
    assert torch.equal(got.cpu().long(), (p.long() + 128) @ v.long())

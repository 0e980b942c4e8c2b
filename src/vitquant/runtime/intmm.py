"""Exact integer matmuls on ``torch._int_mm``: CUDA's shape rules (zero padding) and batched
products of attention heads (one exact float GEMM, or a per-head int8 loop on the CPU).

Split out of :mod:`vitquant.runtime.kernels`, which re-exports every name here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from vitquant.errors import ConfigError
from vitquant.runtime import native, ops

__all__ = [
    "INT_MM_MULTIPLE",
    "INT_MM_MIN_ROWS",
    "int_mm_padding",
    "pad_int_operands",
    "int_mm",
    "exact_float_chunk",
    "int_bmm",
]

#: CUDA ``torch._int_mm`` takes inner and output sizes that are multiples of this ...
INT_MM_MULTIPLE = 8
#: ... and at least this many rows
INT_MM_MIN_ROWS = 17


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def int_mm_padding(m: int, k: int, n: int) -> tuple[int, int, int]:
    """The shape ``(M, K, N)`` of ``[M, K] @ [K, N]`` padded to what CUDA's ``torch._int_mm`` takes.

    Its rules: more than 16 rows, inner and output sizes multiples of 8. ``K`` and ``N`` are
    rounded up to multiples of :data:`INT_MM_MULTIPLE` (at least 16); ``M`` stays as it is above
    16 (cuBLAS needs no row alignment, and padding rows would copy the whole activation), else it
    becomes 24. Zero padding is exact: padded rows and columns are sliced off, and padded inner
    positions add ``0 * 0`` to every dot product.
    """
    if min(m, k, n) < 1:
        raise ConfigError(f"cannot pad an empty matmul ({m}x{k} @ {k}x{n})")
    mult = INT_MM_MULTIPLE
    pm = m if m >= INT_MM_MIN_ROWS else _round_up(INT_MM_MIN_ROWS, mult)
    return pm, max(_round_up(k, mult), 2 * mult), max(_round_up(n, mult), 2 * mult)


def pad_int_operands(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-pads ``a [M, K]`` and ``b [K, N]`` to the shapes of :func:`int_mm_padding`.

    Pure (no kernel call): ``(a_pad @ b_pad)[:M, :N]`` equals ``a @ b`` exactly. Operands that
    need no padding are returned as they are (strided views included).
    """
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = int_mm_padding(m, k, n)
    if (pm, pk) != (m, k):
        a = F.pad(a, (0, pk - k, 0, pm - m))
    if (pk, pn) != (k, n):
        b = F.pad(b, (0, pn - n, 0, pk - k))
    return a, b


def int_mm(a: Tensor, b: Tensor, out: Tensor | None = None, *, pad: bool | None = None) -> Tensor:
    """Exact ``a @ b`` of int8 matrices with int32 accumulation on ``torch._int_mm``.

    Args:
        a: int8 ``[M, K]``.
        b: int8 ``[K, N]`` (rows or columns contiguous).
        out: int32 ``[M, N]`` to write into.
        pad: zero-pad to :func:`int_mm_padding` and slice the result (None: on CUDA, when the
            shape breaks ``_int_mm``'s rules there; the CPU kernel takes any shape).
    """
    m, n = a.shape[0], b.shape[1]
    if pad is None:
        pad = a.is_cuda and int_mm_padding(m, a.shape[1], n) != (m, a.shape[1], n)
    if pad:
        ap, bp = pad_int_operands(a, b)
        res = torch._int_mm(ap, bp)
        if res.shape != (m, n):
            res = res[:m, :n]
        return res if out is None else out.copy_(res)
    if out is None:
        return torch._int_mm(a, b)
    return torch._int_mm(a, b, out=out)


def _code_bound(dtype: torch.dtype) -> int:
    """The largest ``|code|`` of an integer storage dtype."""
    return 255 if dtype == torch.uint8 else 128


def exact_float_chunk(a_dtype: torch.dtype = torch.int8, b_dtype: torch.dtype = torch.int8) -> int:
    """The longest inner dimension whose integer dot products float32 computes exactly.

    Every product has ``|a b| <= bound_a * bound_b`` (``2^14`` for int8), so every partial sum of
    up to ``2^24 / (bound_a * bound_b)`` products (1024 for int8) is an integer float32 holds
    exactly, in any summation order; float32 GEMMs run in TF32 or bfloat16 are exact too (int8
    values fit their mantissas) since they accumulate in float32.
    """
    return max(1, 2**24 // (_code_bound(a_dtype) * _code_bound(b_dtype)))


@contextlib.contextmanager
def _bf16_fpmath(enabled: bool) -> Iterator[None]:
    """Lets oneDNN run float32 matmuls in bfloat16 (exact on integer codes, see
    :func:`exact_float_chunk`) while the block runs."""
    if not enabled:
        yield
        return
    mm = torch.backends.mkldnn.matmul
    old = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = old


def int_bmm(
    a: Tensor,
    b: Tensor,
    *,
    method: str | None = None,
    pad: bool | None = None,
    bf16: bool = False,
    float_out: bool = False,
) -> Tensor:
    """Exact batched ``a @ b`` of integer codes: ``[..., M, K] @ [..., K, N]`` -> int32.

    ``torch._int_mm`` is 2-D only, so a batch of heads runs either

    * ``method="batched"`` (CUDA default, and CPUs with AMX): one batched float32 GEMM per
      slice of at most :func:`exact_float_chunk` inner positions (one slice for int8 with
      ``K <= 1024``: 197 tokens, any head size), exact as explained there, then int32. One
      kernel for all batch entries and heads, no padding. ``bf16=True`` lets oneDNN run it in
      bfloat16 (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``): still exact, since
      every code fits bfloat16's 8-bit mantissa and the products accumulate in float32;
    * ``method="vnni"`` (CPU default with AVX512-VNNI and no AMX): all batch entries and heads
      in one call of the native kernel :func:`~vitquant.runtime.native.vnni_bmm` (exact int8
      ``vpdpbusd`` products, split over torch's threads); where it is unavailable
      (:func:`~vitquant.runtime.native.why_unavailable`), the ``"loop"`` below;
    * ``method="loop"``: one ``torch._int_mm`` per batch entry and
      head on views into one int32 buffer (:func:`~vitquant.runtime.ops.int_mm_loop_eager`), on
      one thread: each small GEMM is faster than the parallel region it would open, and on
      AVX512-VNNI/AVX2 CPUs the int8 GEMMs beat a float32 or bfloat16 ``bmm`` (measured on
      Zen 5: 1.6 ms against 5.7 ms for 96 heads of 197x64, see ``docs/int8.md``). While
      ``torch.compile`` traces, the loop is one opaque operator
      (:func:`~vitquant.runtime.ops.int_mm_loop`). ``pad`` as in :func:`int_mm`.

    Args:
        a: int8 (or uint8, ``batched`` only) codes ``[..., M, K]``.
        b: int8 codes ``[..., K, N]``; batch dimensions broadcast.
        method: ``"batched"``, ``"vnni"`` or ``"loop"`` (None: by device).
        pad: for ``"loop"`` and 2-D operands.
        bf16: for ``"batched"`` on the CPU: allow bfloat16 arithmetic (exact).
        float_out: for ``"batched"`` with one slice (``K <= exact_float_chunk``): return the
            float32 product (exact integers) instead of converting it to int32, for callers
            that rescale it in float anyway.
    """
    if method is None:
        method = "batched" if a.is_cuda else "loop"
    if method not in ("batched", "vnni", "loop"):
        raise ConfigError(
            f"unknown batched int8 matmul method {method!r}; use batched, vnni or loop"
        )
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if not batch and min(m, k, n) > 0:  # a single matrix: int8 GEMM (padded on CUDA)
        return int_mm(a, b, pad=pad)
    if method == "batched":
        step = exact_float_chunk(a.dtype, b.dtype)
        if float_out and 0 < k <= step:
            with _bf16_fpmath(bf16 and not a.is_cuda):
                return torch.matmul(a.float(), b.float())
        out = None
        with _bf16_fpmath(bf16 and not a.is_cuda):
            for start in range(0, k, step):
                end = min(k, start + step)
                part = torch.matmul(a[..., start:end].float(), b[..., start:end, :].float())
                part = part.to(torch.int32)
                out = part if out is None else out.add_(part)
        if out is None:  # K == 0
            out = torch.zeros(*batch, m, n, dtype=torch.int32, device=a.device)
        return out
    if min(m, k, n) == 0:
        return torch.zeros(*batch, m, n, dtype=torch.int32, device=a.device)
    vnni = method == "vnni" and not (a.is_cuda or pad) and b.dtype == torch.int8
    if vnni and torch.compiler.is_compiling():
        return ops.vnni_bmm(a, b)
    if vnni and native.available():
        return native.vnni_bmm(a, b)
    if a.is_cuda or pad:
        out = torch.empty(*batch, m, n, dtype=torch.int32, device=a.device)
        for x, y, o in zip(a.reshape(-1, m, k).unbind(0), b.reshape(-1, k, n).unbind(0),
                           out.view(-1, m, n).unbind(0)):  # fmt: skip
            int_mm(x, y, out=o, pad=pad)
        return out
    if torch.compiler.is_compiling():
        return ops.int_mm_loop(a, b)
    return ops.int_mm_loop_eager(a, b)

"""Custom torch operators that make lowered models ``torch.compile`` (Inductor) friendly.

In eager mode the runtime calls its kernels directly. While ``torch.compile`` traces a lowered
model, the two kernels that Inductor cannot lower by itself run as opaque custom operators
(``torch.library.custom_op``, each with a shape-only fake implementation), so Inductor compiles
everything around them (LayerNorm, softmax and the quantization passes fuse into a few C++
loops) and calls them as external kernels:

* ``vitquant::onednn_qlinear``: oneDNN's int8 linear (``onednn::qlinear_pointwise``, unary or
  with a binary add). The prepacked weight is an opaque oneDNN tensor that Inductor's own int8
  lowering only accepts as a frozen constant; here it stays out of the graph, named by an
  integer handle into :data:`_PACKED` (weakly held: the ``PackedWeight`` owns it);
* ``vitquant::int_mm_loop``: the per-head ``torch._int_mm`` loop of the attention matmuls on
  the CPU (one small GEMM per head on one thread), which traced op by op would be hundreds of
  graph nodes and a thread-count change Dynamo cannot trace;
* ``vitquant::vnni_bmm``, ``vitquant::vnni_bmm_quant`` and ``vitquant::qk_softmax``: the
  native AVX512-VNNI kernels of all heads' attention products (:mod:`vitquant.runtime.native`:
  int32 out, quantized out, and q·kᵀ fused with softmax and quantization), ``ctypes`` calls
  Dynamo cannot trace.

Graphs that hold ``onednn_qlinear`` are tied to the process that packed the weights (the
handle); ``torch.export`` of such graphs is not portable across processes.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

__all__ = [
    "register_packed", "onednn_qlinear", "int_mm_loop", "int_mm_loop_eager", "vnni_bmm",
    "qk_softmax", "vnni_bmm_quant",
]  # fmt: skip

_PACKED: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
_COUNTER = itertools.count(1)


def register_packed(packed: Tensor) -> int:
    """A new handle for a oneDNN prepacked weight (held weakly)."""
    handle = next(_COUNTER)
    _PACKED[handle] = packed
    return handle


@torch.library.custom_op("vitquant::onednn_qlinear", mutates_args=())
def onednn_qlinear(
    x: Tensor,
    handle: int,
    x_scale: float,
    x_zp: int,
    w_scale: Tensor,
    w_zp: Tensor,
    bias: Tensor | None,
    other: Tensor | None,
    o_scale: float,
    o_zp: int,
    out_dtype: torch.dtype,
    post: str,
    algo: str,
) -> Tensor:
    """``onednn::qlinear_pointwise`` (``.binary`` with ``other``) on 2-D uint8 codes ``x``."""
    packed = _PACKED[handle]
    if other is not None:
        return torch.ops.onednn.qlinear_pointwise.binary(
            x, x_scale, x_zp, packed, w_scale, w_zp, other, bias, o_scale, o_zp, out_dtype,
            1.0, 0, "add", 1.0, post, [], algo,
        )  # fmt: skip
    return torch.ops.onednn.qlinear_pointwise(
        x, x_scale, x_zp, packed, w_scale, w_zp, bias, o_scale, o_zp, out_dtype, post, [], algo
    )


@onednn_qlinear.register_fake
def _(
    x: Tensor,
    handle: int,
    x_scale: float,
    x_zp: int,
    w_scale: Tensor,
    w_zp: Tensor,
    bias: Tensor | None,
    other: Tensor | None,
    o_scale: float,
    o_zp: int,
    out_dtype: torch.dtype,
    post: str,
    algo: str,
) -> Tensor:
    return x.new_empty((x.shape[0], w_scale.shape[0]), dtype=out_dtype)


def int_mm_loop_eager(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for int8 ``[..., M, K]`` and ``[..., K, N]`` (same batch shape): one
    ``torch._int_mm`` per matrix on one thread, into one int32 buffer."""
    out = torch.empty(*a.shape[:-1], b.shape[-1], dtype=torch.int32, device=a.device)
    threads = torch.get_num_threads() if not a.is_cuda else 1
    if threads > 1:
        torch.set_num_threads(1)
    try:
        _loop(a, b, out)
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
    return out


def _loop(a: Tensor, b: Tensor, out: Tensor) -> None:
    if a.dim() == 2:
        torch._int_mm(a, b, out=out)
        return
    if a.dim() == 3:  # unbind: one C++ call makes all the views (select per index is slower)
        for x, y, o in zip(a.unbind(0), b.unbind(0), out.unbind(0)):
            torch._int_mm(x, y, out=o)
        return
    for x, y, o in zip(a.unbind(0), b.unbind(0), out.unbind(0)):
        _loop(x, y, o)


@torch.library.custom_op("vitquant::int_mm_loop", mutates_args=())
def int_mm_loop(a: Tensor, b: Tensor) -> Tensor:
    """:func:`int_mm_loop_eager` as an opaque operator (for ``torch.compile``)."""
    return int_mm_loop_eager(a, b)


@int_mm_loop.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)


@torch.library.custom_op("vitquant::vnni_bmm", mutates_args=())
def vnni_bmm(a: Tensor, b: Tensor) -> Tensor:
    """:func:`vitquant.runtime.native.vnni_bmm` as an opaque operator (for ``torch.compile``);
    :func:`int_mm_loop_eager` where the native kernel is unavailable."""
    from vitquant.runtime import native

    return native.vnni_bmm(a, b) if native.available() else int_mm_loop_eager(a, b)


@vnni_bmm.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)


@torch.library.custom_op("vitquant::qk_softmax", mutates_args=())
def qk_softmax(
    q: Tensor, kt: Tensor, alpha: float, scale: float, zero_point: int, lo: int, hi: int
) -> Tensor:
    """:func:`vitquant.runtime.native.qk_softmax` as an opaque operator (``torch.compile``)."""
    from vitquant.runtime import native

    return native.qk_softmax(q, kt, alpha, scale, zero_point, lo, hi)


@qk_softmax.register_fake
def _(
    q: Tensor, kt: Tensor, alpha: float, scale: float, zero_point: int, lo: int, hi: int
) -> Tensor:
    return q.new_empty((*q.shape[:-1], kt.shape[-1]), dtype=torch.int8)


@torch.library.custom_op("vitquant::vnni_bmm_quant", mutates_args=())
def vnni_bmm_quant(
    a: Tensor,
    b: Tensor,
    mul: float,
    scale: float,
    zero_point: int,
    lo: int,
    hi: int,
    dtype: torch.dtype,
    heads_last: bool,
) -> Tensor:
    """:func:`vitquant.runtime.native.vnni_bmm_quant` as an opaque operator."""
    from vitquant.runtime import native

    return native.vnni_bmm_quant(a, b, mul, scale, zero_point, lo, hi, dtype, heads_last=heads_last)


@vnni_bmm_quant.register_fake
def _(
    a: Tensor,
    b: Tensor,
    mul: float,
    scale: float,
    zero_point: int,
    lo: int,
    hi: int,
    dtype: torch.dtype,
    heads_last: bool,
) -> Tensor:
    n = b.shape[-1]
    if heads_last:
        return a.new_empty((a.shape[0], a.shape[2], a.shape[1], n), dtype=dtype)
    return a.new_empty((*a.shape[:-1], n), dtype=dtype)

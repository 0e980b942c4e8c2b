"""Row-wise native kernels of the int8 runtime (``csrc/rows.c``, in the library that
:mod:`vitquant.runtime.native` builds): each row is swept a few times while it sits in L1 and no
float intermediate is written.

* :func:`layernorm_quant`: LayerNorm and the quantization of its output for the next GEMM in
  one pass over each row (float32 or bfloat16 in, bytes out), where ATen runs a LayerNorm, a
  ``quantize_per_tensor`` and an ``int_repr`` copy (3.3 ms of a 26 ms DeiT-S batch-1 forward on
  Zen 4). Statistics in float32 as ATen's, so a code may differ by one step where a value lies
  within an ulp of a rounding midpoint;
* :func:`row_quant`: per-token (dynamic) quantization, each row's grid and codes in two sweeps
  of the row (min/max, codes), bit-exact with the fake quantizer's torch ops (9.8 ms against
  ~0.5 ms for a DeiT-S fc2 input at batch 8 on Zen 4);
* :func:`layernorm_row_quant`: the two above in one: LayerNorm, then per-token quantization of
  the normalised row (a linear with per-token inputs after a LayerNorm: ``qkv``, ``fc1``);
* :func:`row_epilogue`: what a GEMM on per-token codes still owes after oneDNN's per-tensor
  kernel (row scale, zero-point correction, bias, residual), in one pass, written as float32,
  bfloat16 or the codes of the next op (``qkv``'s output as the q/k/v codes of attention);
* :func:`row_epilogue_gelu_quant`: the same epilogue after ``fc1``, GELU, and ``fc2``'s per-token
  input quantization, one row at a time in L1 (the float hidden activation is never written out).

All raise :class:`~vitquant.errors.ConfigError` when the library is unavailable
(:func:`vitquant.runtime.native.why_unavailable`) or the operands do not fit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitquant.errors import ConfigError
from vitquant.runtime.native import library

__all__ = [
    "layernorm_quant", "row_quant", "layernorm_row_quant", "row_epilogue",
    "row_epilogue_gelu_quant",
]  # fmt: skip


def _rows(x: Tensor, what: str, *more: torch.dtype) -> Tensor:
    """``x`` as float32/bfloat16 (or ``more``) CPU rows ``[M, C]`` with contiguous elements (a
    view if it can)."""
    if x.dtype not in (torch.float32, torch.bfloat16, *more) or x.device.type != "cpu":
        raise ConfigError(f"{what} takes float32/bfloat16 CPU tensors, got {x.dtype}")
    c = x.shape[-1]
    x2 = x.reshape(-1, c) if x.dim() != 2 else x
    return x2.contiguous() if c and x2.stride(-1) != 1 else x2


def _code_range(what: str, lo: int, hi: int, dtype: torch.dtype) -> None:
    bound = (0, 255) if dtype == torch.uint8 else (-128, 127)
    if dtype not in (torch.uint8, torch.int8) or not bound[0] <= lo <= hi <= bound[1]:
        raise ConfigError(f"{what}: codes [{lo}, {hi}] do not fit {dtype}")


def _vector(t: Tensor, n: int, what: str) -> Tensor:
    if t.numel() != n:
        raise ConfigError(f"{what}: {n} values expected, got {t.numel()}")
    return t.detach().float().reshape(n).contiguous()


def layernorm_quant(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, lo: int, hi: int, dtype: torch.dtype
) -> Tensor:
    """Codes ``clamp(round(layer_norm(x) * weight + bias), lo, hi)`` in ``dtype``, in one pass.

    The LayerNorm over the last dimension (no affine of its own: ``weight`` and ``bias`` are
    its affine parameters with the quantizer's ``1 / scale`` and zero point folded in, as in
    :class:`~vitquant.runtime.layernorm.LayerNormQuant`), rounding half to even and saturation:
    each row is swept three times while it sits in L1 (mean, variance, codes).

    Args:
        x: float32 or bfloat16 ``[..., C]``.
        weight, bias: float32 ``[C]``.
        eps: the LayerNorm's epsilon.
        lo, hi: the codes' range in the storage dtype.
        dtype: ``torch.uint8`` or ``torch.int8``.
    """
    lib = library()
    x2 = _rows(x, "layernorm_quant")
    c = x.shape[-1]
    if weight.shape != (c,) or bias.shape != (c,):
        raise ConfigError(f"layernorm_quant: weight/bias of {c} values expected")
    _code_range("layernorm_quant", lo, hi, dtype)
    w, b = _vector(weight, c, "layernorm_quant"), _vector(bias, c, "layernorm_quant")
    out = torch.empty(x.shape, dtype=dtype)
    if out.numel():
        lib.vq_layernorm_quant(
            x2.data_ptr(), out.data_ptr(), x2.shape[0], c, x2.stride(0), c,
            int(x.dtype == torch.bfloat16), w.data_ptr(), b.data_ptr(), float(eps), lo, hi,
        )  # fmt: skip
    return out


def _dyn_args(
    what: str, qmin: int, qmax: int, offset: int, symmetric: bool, qdiv: float, clip: float,
    dtype: torch.dtype,
) -> tuple[int, int, int, int, float, float]:  # fmt: skip
    _code_range(what, qmin + offset, qmax + offset, dtype)
    return int(symmetric), int(qmin), int(qmax), int(offset), float(qdiv), float(clip)


def row_quant(
    x: Tensor,
    qmin: int,
    qmax: int,
    offset: int,
    symmetric: bool,
    qdiv: float,
    clip: float,
    dtype: torch.dtype,
    *,
    mul: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row grids and codes of ``x`` (:func:`~vitquant.quant.primitives.token_qparams`).

    Args:
        x: float32 or bfloat16 ``[..., C]``, or int32 products (attn·v) whose values are
            ``torch.mul(x, mul)`` in float32.
        qmin, qmax: the grid.
        offset: added to the codes for storage (128 stores a signed grid as uint8).
        symmetric: ``scale = max(clip * max|row|, 1e-12) / qdiv`` and zero point 0; else the
            unsigned grid over ``clip * [min(row, 0), max(row, 0)]``.
        qdiv: the grid's divisor: a symmetric grid's ``qmax``; ``2^bits - 1`` for an asymmetric
            one (whose zero point lies in ``[0, qdiv]``, as in
            :func:`~vitquant.quant.primitives.qparams_from_minmax`).
        clip: the clip ratio.
        dtype: ``torch.uint8`` or ``torch.int8`` storage.

    Returns:
        ``(codes [M, C] in dtype, scale [M, 1], zero point [M, 1])`` with ``M`` the rows of
        ``x``; codes ``clamp(round(x / scale) + zero_point, qmin, qmax) + offset``.
    """
    lib = library()
    x2 = _rows(x, "row_quant", torch.int32)
    args = _dyn_args("row_quant", qmin, qmax, offset, symmetric, qdiv, clip, dtype)
    kind = {torch.float32: 0, torch.bfloat16: 1, torch.int32: 2}[x2.dtype]
    rows, c = x2.shape
    out, scale, zero = _row_outputs(rows, c, dtype)
    if out.numel():
        lib.vq_row_quant(
            x2.data_ptr(), out.data_ptr(), scale.data_ptr(), zero.data_ptr(), rows, c,
            x2.stride(0), c, kind, *args, float(mul),
        )  # fmt: skip
    return out, scale, zero


def layernorm_row_quant(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    qmin: int,
    qmax: int,
    offset: int,
    symmetric: bool,
    qdiv: float,
    clip: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`row_quant` of ``layer_norm(x, weight, bias, eps)`` over the last dimension, with
    no float tensor written (statistics, grid and codes: three sweeps of each row in L1).

    Equal to ``row_quant(F.layer_norm(x, ...), ...)`` up to the LayerNorm's float rounding (so a
    code may differ by one step where a value lies within an ulp of a rounding midpoint).
    Arguments as :func:`row_quant`'s; ``weight``, ``bias``: the affine ``[C]`` (a SmoothQuant
    divisor of the next layer folded in by the caller).
    """
    lib = library()
    x2 = _rows(x, "layernorm_row_quant")
    rows, c = x2.shape
    w, b = _vector(weight, c, "layernorm_row_quant"), _vector(bias, c, "layernorm_row_quant")
    args = _dyn_args("layernorm_row_quant", qmin, qmax, offset, symmetric, qdiv, clip, dtype)
    out, scale, zero = _row_outputs(rows, c, dtype)
    if out.numel():
        lib.vq_layernorm_row_quant(
            x2.data_ptr(), out.data_ptr(), scale.data_ptr(), zero.data_ptr(), rows, c,
            x2.stride(0), c, int(x.dtype == torch.bfloat16), w.data_ptr(), b.data_ptr(),
            float(eps), *args,
        )  # fmt: skip
    return out, scale, zero


def row_epilogue(
    y: Tensor,
    scale: Tensor,
    *,
    zero_point: Tensor | None = None,
    wsum: Tensor | None = None,
    bias: Tensor | None = None,
    other: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    lo: int = 0,
    hi: int = 0,
) -> Tensor:
    """``(y - zero_point * wsum) * scale + bias + other`` in one pass, as torch's ``sub_``,
    ``mul_``, ``add_`` and ``+`` compute it (bit-exact in float32).

    Args:
        y: float32 ``[M, N]``, the GEMM's output on per-token codes (weight scales applied).
        scale, zero_point: the rows' grids ``[M, 1]`` (zero point with ``wsum`` or neither).
        wsum: ``[N]`` weight-code row sums times their scales (an asymmetric grid's correction).
        bias: ``[N]`` or None.
        other: float32 or bfloat16 ``[M, N]`` (a residual), or None.
        out_dtype: ``torch.float32`` (written over ``y``), ``torch.bfloat16``, or
            ``torch.int8``/``torch.uint8`` codes ``clamp(round(t), lo, hi)`` (a grid's
            ``1 / scale`` and zero point folded into ``scale``, ``wsum`` and ``bias``).
    """
    lib = library()
    if y.dtype != torch.float32 or y.dim() != 2 or y.device.type != "cpu" or y.stride(-1) != 1:
        raise ConfigError("row_epilogue takes a float32 CPU matrix with contiguous rows")
    m, n = y.shape
    if (zero_point is None) != (wsum is None):
        raise ConfigError("row_epilogue: a zero point needs wsum, and wsum a zero point")
    s = _vector(scale, m, "row_epilogue scale")
    z = None if zero_point is None else _vector(zero_point, m, "row_epilogue zero point")
    ws = None if wsum is None else _vector(wsum, n, "row_epilogue wsum")
    b = None if bias is None else _vector(bias, n, "row_epilogue bias")
    r = None
    if other is not None:
        if other.numel() != m * n:
            raise ConfigError(f"row_epilogue: other of {m}x{n} values expected")
        r = _rows(other.reshape(m, n), "row_epilogue")
    if out_dtype == torch.float32:
        out, mode = y, 0
    elif out_dtype == torch.bfloat16:
        out, mode = torch.empty((m, n), dtype=out_dtype), 1
    else:
        _code_range("row_epilogue", lo, hi, out_dtype)
        out, mode = torch.empty((m, n), dtype=out_dtype), 2
    if y.numel():
        lib.vq_row_epilogue(
            y.data_ptr(), m, n, y.stride(0), s.data_ptr(), _ptr(z), _ptr(ws), _ptr(b), _ptr(r),
            0 if r is None else r.stride(0), int(r is not None and r.dtype == torch.bfloat16),
            out.data_ptr(), out.stride(0), mode, int(lo), int(hi),
        )  # fmt: skip
    return out


def row_epilogue_gelu_quant(
    y: Tensor,
    scale: Tensor,
    *,
    zero_point: Tensor | None = None,
    wsum: Tensor | None = None,
    bias: Tensor | None = None,
    div: Tensor | None = None,
    qmin: int,
    qmax: int,
    offset: int,
    symmetric: bool,
    qdiv: float,
    clip: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`row_quant` of ``gelu((y - zero_point * wsum) * scale + bias) / div`` (erf GELU),
    row by row in L1; ``y`` is overwritten with the hidden activation.

    GELU is computed as torch's CPU kernel computes it (the same erf approximation and order of
    operations) but for its exponential (Cephes' polynomial, torch's Sleef's), so a value may
    differ in its last bit and a code by one step where it lies on a rounding midpoint.

    Args:
        y, scale, zero_point, wsum, bias: as :func:`row_epilogue`'s.
        div: ``[N]`` divisors of the next layer's input (its SmoothQuant factors), or None.
        qmin, qmax, offset, symmetric, qdiv, clip, dtype: the next layer's grid, as
            :func:`row_quant`'s.

    Returns:
        ``(codes [M, N], scale [M, 1], zero point [M, 1])`` of the hidden activation.
    """
    lib = library()
    if y.dtype != torch.float32 or y.dim() != 2 or y.device.type != "cpu" or not y.is_contiguous():
        raise ConfigError("row_epilogue_gelu_quant takes a contiguous float32 CPU matrix")
    m, n = y.shape
    if (zero_point is None) != (wsum is None):
        raise ConfigError("row_epilogue_gelu_quant: a zero point needs wsum, and wsum a zero point")
    what = "row_epilogue_gelu_quant"
    s = _vector(scale, m, what)
    z = None if zero_point is None else _vector(zero_point, m, what)
    ws = None if wsum is None else _vector(wsum, n, what)
    b = None if bias is None else _vector(bias, n, what)
    d = None if div is None else _vector(div, n, what)
    args = _dyn_args(what, qmin, qmax, offset, symmetric, qdiv, clip, dtype)
    out, s2, z2 = _row_outputs(m, n, dtype)
    if y.numel():
        lib.vq_row_epilogue_gelu_quant(
            y.data_ptr(), m, n, y.stride(0), s.data_ptr(), _ptr(z), _ptr(ws), _ptr(b), _ptr(d),
            out.data_ptr(), n, s2.data_ptr(), z2.data_ptr(), *args,
        )  # fmt: skip
    return out, s2, z2


def _row_outputs(rows: int, c: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Empty codes ``[rows, c]`` and float32 row scales and zero points ``[rows, 1]``."""
    grid = (
        torch.empty((rows, 1), dtype=torch.float32),
        torch.empty((rows, 1), dtype=torch.float32),
    )
    return torch.empty((rows, c), dtype=dtype), *grid


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()

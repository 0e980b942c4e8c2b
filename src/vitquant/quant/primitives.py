"""Pure quantization maths, shared by every method (PTQ, LSQ, Q-ViT, VVTQ, DiffQ, export, runtime).

Nothing here holds state. Conventions:

* an integer grid ``[qmin, qmax]`` comes from :func:`qrange`;
* ``x_q = clamp(round(x / scale) + zero_point, qmin, qmax)``;
* ``x_hat = (x_q - zero_point) * scale``;
* ``scale`` and ``zero_point`` broadcast against ``x`` (use :func:`expand_to` for a channel axis);
* fake quantization has straight-through gradients inside the clipping range and zero outside,
  as ``torch.fake_quantize_per_tensor_affine`` does.

The gradient tricks (``round_ste``, ``grad_scale``) follow LSQ (Esser et al., 2020,
arXiv 1902.08153).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitquant.errors import ConfigError

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "check_bits",
    "qrange",
    "round_ste",
    "floor_ste",
    "grad_scale",
    "expand_to",
    "scale_from_amax",
    "qparams_from_minmax",
    "quantize",
    "dequantize",
    "fake_quant",
    "fake_quant_ste",
    "log2_quantize",
    "log2_dequantize",
    "fake_quant_log2",
    "minmax_levels",
    "minmax_dequantize",
    "lsq_grad_factor",
    "mse_search_rows",
    "token_qparams",
    "integer_matmul",
    "product_bound",
]

MIN_BITS = 2
MAX_BITS = 16


def check_bits(bits: int, lo: int = MIN_BITS, hi: int = MAX_BITS, what: str = "bits") -> int:
    """``bits`` as an int; a one-line :class:`ConfigError` unless it is an integer in lo..hi."""
    try:
        ok = not isinstance(bits, bool) and int(bits) == bits and lo <= int(bits) <= hi
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{what}={bits!r} is out of range: use an integer in {lo}..{hi}")
    return int(bits)


def qrange(bits: int, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
    """Integer grid of a ``bits``-bit quantizer.

    Args:
        bits: number of bits (1..16).
        signed: two's-complement grid ``[-2^(b-1), 2^(b-1)-1]``; else ``[0, 2^b-1]``.
        narrow: drop the most negative level (signed: ``[-(2^(b-1)-1), 2^(b-1)-1]``, symmetric
            around zero as TensorRT's narrow range), or the top level when unsigned.

    Returns:
        ``(qmin, qmax)``.
    """
    bits = check_bits(bits, 1, MAX_BITS)
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if narrow:
            qmin += 1
    else:
        qmin, qmax = 0, 2**bits - 1
        if narrow:
            qmax -= 1
    return qmin, qmax


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass."""
    return (torch.round(x) - x).detach() + x


def floor_ste(x: Tensor) -> Tensor:
    """``floor(x)`` in the forward pass, identity gradient in the backward pass."""
    return (torch.floor(x) - x).detach() + x


def grad_scale(x: Tensor, scale: float | Tensor) -> Tensor:
    """Returns ``x`` unchanged, its gradient multiplied by ``scale`` (LSQ's gradient scaling)."""
    y = x * scale
    return (x - y).detach() + y


def expand_to(t: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Reshapes a per-channel vector ``t`` so it broadcasts against ``x`` along ``axis``.

    ``axis=None`` (per tensor) returns ``t`` unchanged. Tensors that already have ``x.dim()``
    dimensions are returned unchanged too.
    """
    if axis is None or t.dim() == x.dim() or t.dim() == 0:
        return t
    axis = axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def scale_from_amax(
    amax: Tensor, bits: int, signed: bool = True, narrow: bool = False, eps: float = 1e-12
) -> Tensor:
    """Scale of a symmetric quantizer that maps ``[-amax, amax]`` (or ``[0, amax]``) onto the grid.

    Signed grids divide by ``qmax`` (``2^(b-1)-1``), as TensorRT's ``127 / amax``; unsigned grids
    divide by ``2^b - 1``.
    """
    _, qmax = qrange(bits, signed, narrow)
    return torch.clamp(amax.float(), min=eps) / qmax


def qparams_from_minmax(
    xmin: Tensor, xmax: Tensor, bits: int, eps: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """Asymmetric (affine) ``(scale, zero_point)`` for an unsigned grid covering ``[xmin, xmax]``.

    The range is widened to include zero so that zero is exactly representable.
    """
    qmin, qmax = qrange(bits, signed=False)
    xmin = torch.minimum(xmin.float(), torch.zeros_like(xmin, dtype=torch.float))
    xmax = torch.maximum(xmax.float(), torch.zeros_like(xmax, dtype=torch.float))
    scale = torch.clamp((xmax - xmin) / (qmax - qmin), min=eps)
    zero_point = torch.clamp(torch.round(qmin - xmin / scale), qmin, qmax)
    return scale, zero_point


def quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | int,
    qmin: int,
    qmax: int,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)``, cast to ``dtype`` if given.

    ``scale`` and ``zero_point`` must already broadcast against ``x``.
    """
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return q.to(dtype) if dtype is not None else q


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | int = 0) -> Tensor:
    """``(q - zero_point) * scale`` in float32."""
    return (q.float() - zero_point) * scale


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor | int, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize with straight-through gradients inside the range, zero outside.

    Matches ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` (forward and
    gradient with respect to ``x``); ``scale`` and ``zero_point`` get no gradient here (see
    :func:`fake_quant_ste` for learnable ranges).
    """
    scale = scale.detach() if isinstance(scale, Tensor) else scale
    zp = zero_point.detach() if isinstance(zero_point, Tensor) else zero_point
    q = torch.round(x / scale) + zp
    inside = (q >= qmin) & (q <= qmax)
    x_hat = (torch.clamp(q, qmin, qmax) - zp) * scale
    return torch.where(inside, x + (x_hat - x).detach(), x_hat.detach())


def fake_quant_ste(
    x: Tensor, scale: Tensor, zero_point: Tensor | int, qmin: int, qmax: int
) -> Tensor:
    """Fake quantization differentiable in ``x``, ``scale`` and ``zero_point`` (LSQ / LSQ+).

    ``x_hat = (clamp(round_ste(x / s + z), qmin, qmax) - z) * s``. Callers apply
    :func:`grad_scale` to ``scale`` (and ``zero_point``) first for LSQ's gradient scaling. With
    integer ``z`` the gradients match ``torch._fake_quantize_learnable_per_tensor_affine``.
    """
    q = torch.clamp(round_ste(x / scale + zero_point), qmin, qmax)
    return (q - zero_point) * scale


# --- logarithmic grids (FQ-ViT's log2 and RepQ-ViT's log-sqrt2 quantizers) -------------------
# Added by the quantizer engineer for ``vitquant.methods.repq.log2``.


def log2_quantize(x: Tensor, scale: Tensor, bits: int, sqrt2: bool = False) -> Tensor:
    """Codes of a logarithmic quantizer for non-negative ``x`` (attention probabilities).

    ``q = clamp(round(-log_b(x / scale)), 0, 2^bits - 1)`` with base ``b = 2`` or ``sqrt(2)``
    (``sqrt2=True``, RepQ-ViT); the top code ``2^bits - 1`` stands for zero and also takes every
    value that rounds past it (FQ-ViT maps those to zero too). Values above ``scale`` get code 0.
    """
    qmax = 2**bits - 1
    mult = 2.0 if sqrt2 else 1.0
    r = x.float() / scale
    e = -torch.log2(torch.clamp(r, min=torch.finfo(torch.float32).tiny)) * mult
    q = torch.clamp(torch.round(e), 0, qmax)
    return torch.where(r > 0, q, torch.full_like(q, qmax))


def log2_dequantize(q: Tensor, scale: Tensor, bits: int, sqrt2: bool = False) -> Tensor:
    """``scale * 2^(-q)`` (or ``scale * 2^(-q/2)`` for ``sqrt2``); the top code is zero."""
    qmax = 2**bits - 1
    mult = 2.0 if sqrt2 else 1.0
    q = q.float()
    x = scale * torch.exp2(-q / mult)
    return torch.where(q >= qmax, torch.zeros_like(x), x)


def fake_quant_log2(x: Tensor, scale: Tensor, bits: int, sqrt2: bool = False) -> Tensor:
    """Log-domain quantize-dequantize; straight-through gradient on ``[0, scale]``, zero outside."""
    scale = scale.detach() if isinstance(scale, Tensor) else scale
    with torch.no_grad():
        x_hat = log2_dequantize(log2_quantize(x, scale, bits, sqrt2), scale, bits, sqrt2)
        x_hat = x_hat.to(x.dtype)
    inside = (x >= 0) & (x <= scale)
    return torch.where(inside, x + (x_hat - x).detach(), x_hat)


# --- DiffQ's min-max grid with per-group bits ------------------------------------------------
# Added by the DiffQ engineer for ``vitquant.methods.diffq`` (Defossez et al., 2021, arXiv
# 2104.09987).


def minmax_levels(x: Tensor, mn: float, mx: float, bits: Tensor | int) -> Tensor:
    """Levels of DiffQ's grid over ``[mn, mx]``: ``round((x - mn) / (mx - mn) * (2^b - 1))``.

    ``bits`` (a tensor, possibly one value per group, or an int) broadcasts against ``x``. The
    operations run in the order DiffQ's reference runs them (normalise to ``[0, 1]``, then divide
    by the float32 step ``1 / (2^b - 1)``), so the levels are bit-identical to it. A constant
    tensor (``mx == mn``) gets level 0 everywhere instead of DiffQ's 0/0. Returns float levels.
    """
    span = mx - mn
    if not span > 0:
        span = 1.0
    unit = 1 / (2 ** torch.as_tensor(bits, device=x.device).float() - 1)
    return ((x - mn) / span / unit).round()


def minmax_dequantize(levels: Tensor, mn: float, mx: float, bits: Tensor | int) -> Tensor:
    """Inverse of :func:`minmax_levels`: ``mn + levels / (2^b - 1) * (mx - mn)`` in float32."""
    unit = 1 / (2 ** torch.as_tensor(bits, device=levels.device).float() - 1)
    return levels.float() * unit * (mx - mn) + mn


# --- LSQ initialisation and gradient scaling --------------------------------------------------
# Added by the QAT engineer for ``vitquant.methods.lsq.quantizer`` (Esser et al., 2020,
# arXiv 1902.08153; LSQ+, Bhalgat et al., 2020, arXiv 2004.09576).


def lsq_grad_factor(numel_per_scale: int, qmax: int) -> float:
    """LSQ's step-size gradient scale ``g = 1 / sqrt(N · Q_P)``.

    ``N`` is the number of elements sharing one scale (weights of a channel, or activation
    elements of a batch), ``Q_P`` the largest positive level.
    """
    return 1.0 / ((max(1, int(numel_per_scale)) * max(1, int(qmax))) ** 0.5)


def mse_search_rows(
    rows: Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool = True,
    steps: int = 100,
    lowest: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Per-row ``(scale, zero_point)`` minimising the quantization MSE over clipping ranges.

    Each row ``r`` of ``rows [G, M]`` is tried with ranges ``α·[min_r, max_r]`` (asymmetric) or
    ``α·max|r|`` (symmetric) for ``steps`` values of ``α`` in ``[lowest, 1]``; the ``α`` with the
    smallest ``mean((fake_quant(r) - r)²)`` wins. Symmetric scales are ``α·max|r| / qmax``
    (``zero_point`` 0); asymmetric ones cover ``[α·min, α·max]`` with an integer zero point.
    """
    x = rows.detach().float()
    best_err = torch.full((x.shape[0],), float("inf"), device=x.device)
    best_s = torch.ones(x.shape[0], device=x.device)
    best_z = torch.zeros(x.shape[0], device=x.device)
    amax = x.abs().amax(dim=1)
    lo = torch.minimum(x.amin(dim=1), torch.zeros_like(amax))
    hi = torch.maximum(x.amax(dim=1), torch.zeros_like(amax))
    for a in torch.linspace(lowest, 1.0, steps).tolist():
        if symmetric:
            s = torch.clamp(a * amax / qmax, min=1e-12)
            z = torch.zeros_like(s)
        else:
            s = torch.clamp(a * (hi - lo) / (qmax - qmin), min=1e-12)
            z = torch.clamp(torch.round(qmin - a * lo / s), qmin, qmax)
        q = torch.clamp(torch.round(x / s[:, None]) + z[:, None], qmin, qmax)
        err = ((q - z[:, None]) * s[:, None] - x).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def token_qparams(
    x: Tensor,
    bits: int,
    signed: bool = True,
    symmetric: bool = True,
    narrow: bool = False,
    clip: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-token (dynamic) ``(scale, zero_point)`` of ``x``: one grid per index of every
    dimension but the last, shaped ``[..., 1]`` to broadcast against ``x``.

    Symmetric: ``scale = clip * max|row| / qmax`` (zero point 0), as
    :func:`scale_from_amax`; asymmetric: the unsigned grid over ``clip * [min(row, 0),
    max(row, 0)]``, as :func:`qparams_from_minmax`. Computed from ``x.detach()`` (the scale
    carries no gradient), in float32. An all-zero row gets the smallest scale (codes 0).
    """
    x = x.detach().float()
    if symmetric:
        amax = x.abs().amax(dim=-1, keepdim=True) * clip
        s = scale_from_amax(amax, bits, signed, narrow)
        return s, torch.zeros_like(s)
    lo = x.amin(dim=-1, keepdim=True) * clip
    hi = x.amax(dim=-1, keepdim=True) * clip
    return qparams_from_minmax(lo, hi, bits)


def integer_matmul(a: Tensor, b: Tensor, scale: Tensor, bound: int | None = None) -> Tensor:
    """``(a @ b) * scale`` for integer-valued ``a`` and ``b`` (codes minus zero points), as an
    integer GEMM and its float epilogue compute it, so that every implementation gives the same
    bits: the sum of products exact (in ``a``'s float dtype while a bound on ``|a| @ |b|`` fits
    its mantissa, else in float64) and rounded once to ``a``'s dtype, as a cast of the int32
    accumulator is, then times ``scale`` rounded to that dtype.

    ``bound`` is a bound known in advance (``K * range_a * range_b`` from the grids); where it
    is missing or does not fit, the bound is taken from the data (:func:`product_bound`), which
    keeps long sums of small codes (softmax probabilities times ``v`` at 577 tokens) in the
    fast dtype. Sums of dequantized floats instead depend on the summation order; where a
    per-token grid is built from such products (``attn·v`` before a dynamic ``proj`` input),
    values that are exact rounding ties would fall to either side.
    """
    exact = 2.0 / torch.finfo(a.dtype).eps  # 2**24 in float32: every integer below is exact
    fits = bound is not None and bound < exact
    acc_dtype = a.dtype if fits or product_bound(a, b) < exact else torch.float64
    acc = torch.matmul(a.to(acc_dtype), b.to(acc_dtype)).to(a.dtype)
    return acc * scale.to(a.dtype)


def product_bound(a: Tensor, b: Tensor) -> float:
    """A bound on every entry, and every partial sum, of ``|a| @ |b|`` (batched over leading
    dimensions): the smaller of ``max_row sum|a| * max|b|`` and ``max|a| * max_col sum|b|``.
    Exact for integer-valued operands whose row and column sums fit ``a``'s mantissa."""
    abs_a, abs_b = a.abs(), b.abs()
    by_rows = abs_a.sum(-1).amax() * abs_b.amax()
    by_cols = abs_a.amax() * abs_b.sum(-2).amax()
    return float(torch.minimum(by_rows.double(), by_cols.double()))

"""Pure quantization maths, shared by every method (PTQ, LSQ, Q-ViT, VVTQ, DiffQ, export, runtime).

Nothing here holds state. Conventions:

* an integer grid ``[qmin, qmax]`` comes from :func:`qrange`;
* ``x_q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x_hat = (x_q - zero_point) * scale``;
* ``scale`` and ``zero_point`` broadcast against ``x`` (use :func:`expand_to` for a channel axis);
* fake quantization has straight-through gradients inside the clipping range and zero outside,
  as ``torch.fake_quantize_per_tensor_affine`` does.

The gradient tricks (``round_ste``, ``grad_scale``) follow LSQ (Esser et al., 2020,
arXiv 1902.08153).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

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
]

MIN_BITS = 2
MAX_BITS = 16


def check_bits(bits: int, lo: int = MIN_BITS, hi: int = MAX_BITS, what: str = "bits") -> int:
    """Returns ``bits`` as an int, or raises a one-line :class:`ConfigError` if outside ``lo..hi``."""
    if isinstance(bits, bool) or int(bits) != bits or not lo <= int(bits) <= hi:
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
    """Returns ``x`` unchanged, with its gradient multiplied by ``scale`` (LSQ's gradient scaling)."""
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

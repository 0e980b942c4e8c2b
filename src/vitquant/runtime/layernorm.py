"""A fused block's LayerNorm and the quantization of its output for the next int8 GEMM (``qkv``
or ``fc1``), as one operation: :class:`LayerNormQuant` for a fixed grid,
:class:`LayerNormRowQuant` for per-token (dynamic) grids; :func:`norm_quant` picks one.

The quantizer's ``1 / scale`` and zero point (and a smoothed next layer's per-channel divisors)
are folded into the LayerNorm's affine parameters, so only rounding and saturation are left.
Eager on a CPU with vitquant's native kernels the whole operation is one pass per row
(:func:`vitquant.runtime.rows.layernorm_quant`, :func:`~vitquant.runtime.rows.layernorm_row_quant`);
under ``torch.compile`` Inductor fuses the
LayerNorm and the rounding into one loop of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.runtime import native, rows
from vitquant.runtime.dynamic import DynamicInt8Linear, DynCodes
from vitquant.runtime.kernels import quantize_act, quantize_fast
from vitquant.runtime.modules import Int8Linear, _is_active

__all__ = ["LayerNormQuant", "LayerNormRowQuant", "norm_quant"]


def norm_quant(
    norm: nn.Module, lin: Int8Linear | DynamicInt8Linear
) -> LayerNormQuant | LayerNormRowQuant | None:
    """The fused LayerNorm-and-quantize module for ``norm`` before ``lin`` (None when ``norm``
    is not a plain LayerNorm)."""
    if not LayerNormQuant.supported(norm):
        return None
    if isinstance(lin, DynamicInt8Linear):
        return LayerNormRowQuant(norm, lin)  # type: ignore[arg-type]
    return LayerNormQuant(norm, lin)  # type: ignore[arg-type]


class LayerNormQuant(nn.Module):
    """``LayerNorm`` followed by quantization, with ``1 / scale`` and the zero point folded into
    the LayerNorm's affine parameters (one float pass fewer than normalise-then-quantize); a
    smoothed next layer's ``1 / (s * scale)`` is folded the same way. Eager on a CPU with the
    native kernels it is one pass (:func:`~vitquant.runtime.rows.layernorm_quant`); while
    ``torch.compile`` traces, Inductor fuses the LayerNorm and the rounding into one loop."""

    def __init__(self, norm: nn.LayerNorm, lin: Int8Linear) -> None:
        super().__init__()
        a = lin.act
        c = norm.normalized_shape
        w = norm.weight.detach().float() if norm.weight is not None else torch.ones(c)
        bias = norm.bias.detach().float() if norm.bias is not None else torch.zeros(c)
        self.shape, self.eps, self.act, self.dtype = tuple(c), float(norm.eps), a, lin.dtype
        self.fast = lin.backend != "reference"
        div: float | Tensor = a.scale if lin.in_div is None else lin.in_div.to(w.device)
        self.register_buffer("weight", (w / div).contiguous())
        self.register_buffer("bias", (bias / div + a.zero_point + a.offset(lin.dtype)).contiguous())
        off = a.offset(lin.dtype)
        #: the codes' range in storage (the native kernel's saturation)
        self.lo, self.hi = a.qmin + off, a.qmax + off

    @staticmethod
    def supported(norm: nn.Module) -> bool:
        """Plain LayerNorms (a QuantLayerNorm only while its input quantizer is off)."""
        if not isinstance(norm, nn.LayerNorm):
            return False
        return not _is_active(getattr(norm, "input_quantizer", None))

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.fast
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and native.available()
        ):  # one native pass, no float tensor written (float32 or bfloat16 in)
            return rows.layernorm_quant(
                x, self.weight, self.bias, self.eps, self.lo, self.hi, self.dtype
            )
        # a bfloat16 residual stream is normalised in float32 (Inductor fuses the cast)
        y = F.layer_norm(x.float(), self.shape, self.weight, self.bias, self.eps)
        if self.fast:  # rounding and saturation only: one pass
            return quantize_fast(y, self.act, self.dtype, prescaled=True)
        return quantize_act(y, self.act, self.dtype, scaled=True, shifted=True, offset_in=True)


class LayerNormRowQuant(nn.Module):
    """``LayerNorm`` followed by the per-token quantization of a
    :class:`~vitquant.runtime.dynamic.DynamicInt8Linear`'s input (its SmoothQuant divisors
    folded into the LayerNorm's affine parameters); returns the linear's
    :class:`~vitquant.runtime.dynamic.DynCodes`. Eager on a CPU with the native kernels it is
    one kernel (:func:`~vitquant.runtime.rows.layernorm_row_quant`), else the LayerNorm and the
    linear's own row quantization."""

    def __init__(self, norm: nn.LayerNorm, lin: DynamicInt8Linear) -> None:
        super().__init__()
        c = norm.normalized_shape
        w = norm.weight.detach().float() if norm.weight is not None else torch.ones(c)
        bias = norm.bias.detach().float() if norm.bias is not None else torch.zeros(c)
        if lin.smooth is not None:
            w, bias = w / lin.smooth.to(w.device), bias / lin.smooth.to(w.device)
        self.shape, self.eps, self.lin = tuple(c), float(norm.eps), lin
        self.register_buffer("weight", w.contiguous())
        self.register_buffer("bias", bias.contiguous())

    def forward(self, x: Tensor) -> DynCodes:
        lin, lead = self.lin, tuple(x.shape[:-1])
        if lin._fast(x):
            a = lin.act
            codes, s, z = rows.layernorm_row_quant(
                x, self.weight, self.bias, self.eps, a.qmin, a.qmax, lin.offset, a.symmetric,
                a.qdiv, a.clip, lin.dtype,
            )  # fmt: skip
            return DynCodes(codes, s, z, lead)
        y = F.layer_norm(x.float(), self.shape, self.weight, self.bias, self.eps)
        return lin.row_codes(y.reshape(-1, lin.in_features), lead)

"""Integer Linear with per-token dynamic input scales: :class:`DynamicInt8Linear`.

It replaces a ``QuantLinear`` whose input quantizer is a
:class:`~vitquant.quant.quantizers.dynamic.DynamicQuantizer` (``QuantConfig(act_dynamic=True)``).
Each row ``m`` of the input gets its grid ``(s_m, z_m)`` from
:func:`~vitquant.quant.primitives.token_qparams` (the fake quantizer's own function), its codes
``x_q`` go through the same integer GEMM as :class:`~vitquant.runtime.modules.Int8Linear`, and
the row scale is applied after it, since it factors out of the product:

    y[m, n] = s_m * w_n * (sum_k x_q[m, k] c[n, k] - z_m * sum_k c[n, k]) + b[n]

(``c`` the int8 weight codes, ``w_n`` their scale; ``z_m = 0`` on symmetric grids). The GEMM runs
with input scale 1 on the codes, so oneDNN's per-tensor int8 kernel serves every row. A
SmoothQuant factor on the input (``smooth_scale``) divides it before the row grids are taken, as
in the fake-quant module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.quant import primitives as P
from vitquant.runtime import native, rows
from vitquant.runtime.kernels import ActQ, PackedWeight, int8_linear, quantize_act
from vitquant.runtime.modules import Int8Linear, code_dtype, fits_8bit, weight_codes

__all__ = ["DynAct", "DynCodes", "DynamicInt8Linear", "dyn_from_quantizer", "linear_from_quant"]


@dataclass(frozen=True)
class DynAct:
    """The format of a per-token dynamic quantizer (:class:`~vitquant.quant.QParams` with
    ``kind="dynamic"``): bits, grid, symmetry and the clip ratio."""

    bits: int
    signed: bool
    symmetric: bool
    narrow: bool
    clip: float
    qmin: int
    qmax: int

    @property
    def qdiv(self) -> int:
        """The grid's divisor: a symmetric grid's ``qmax``; ``2^bits - 1`` for an asymmetric one
        (:func:`~vitquant.quant.primitives.qparams_from_minmax`'s unsigned grid)."""
        if self.symmetric:
            return P.qrange(self.bits, self.signed, self.narrow)[1]
        return 2**self.bits - 1

    def grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` per row of ``x``, shaped ``[..., 1]``."""
        return P.token_qparams(x, self.bits, self.signed, self.symmetric, self.narrow, self.clip)


def dyn_from_quantizer(q: nn.Module | None) -> tuple[DynAct | None, str]:
    """The :class:`DynAct` of an enabled, calibrated dynamic quantizer, or ``(None, reason)``."""
    if q is None or not getattr(q, "enabled", False) or not getattr(q, "is_calibrated", False):
        return None, "not quantized"
    qp = q.qparams()  # type: ignore[operator]
    if qp.kind != "dynamic":
        return None, f"{qp.kind} quantizer"
    if not fits_8bit(qp.qmin, qp.qmax):
        return None, f"{qp.bits}-bit activations do not fit in 8 bits"
    sym = bool(getattr(q, "symmetric", True))
    narrow = bool(getattr(q, "narrow", False))
    clip = float(qp.scale.reshape(()))
    return DynAct(qp.bits, qp.signed, sym, narrow, clip, qp.qmin, qp.qmax), ""


class DynCodes(NamedTuple):
    """A quantized input of :class:`DynamicInt8Linear`: stored codes ``[M, K]``, their row
    scales and zero points ``[M, 1]``, and the input's leading shape."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    lead: tuple[int, ...]


def linear_from_quant(
    m: nn.Module, backend: str
) -> tuple[Int8Linear | DynamicInt8Linear | None, str]:
    """The integer Linear for a ``QuantLinear``: :class:`DynamicInt8Linear` when its input
    quantizer is dynamic, else :class:`~vitquant.runtime.modules.Int8Linear`."""
    if getattr(getattr(m, "input_quantizer", None), "kind", "") == "dynamic":
        return DynamicInt8Linear.from_quant(m, backend)
    return Int8Linear.from_quant(m, backend)


class DynamicInt8Linear(nn.Module):
    """Linear layer on an int8 GEMM with one input scale (and zero point) per token.

    Args:
        codes: int8 weight codes ``[N, K]``.
        w_scale: float ``[N]``.
        bias: float ``[N]`` or None.
        act: the input format.
        backend: ``"onednn" | "intmm" | "reference"`` (exact float64 products).
        smooth: per-input-channel smoothing factors ``[K]`` (the input is divided by them), or
            None.

    Inside a fused :class:`~vitquant.runtime.fused.Int8Block` it takes the place of an
    ``Int8Linear`` (same ``quantize_input`` / ``forward_codes`` / ``float_from_codes``; its
    codes are :class:`DynCodes`); the block then runs its float output through the next op, as
    the row scale cannot go into oneDNN's one-scale epilogue.
    """

    dynamic = True
    out_q = None  # no after-GEMM quantizer (refused by from_quant)

    def __init__(
        self,
        codes: Tensor,
        w_scale: Tensor,
        bias: Tensor | None,
        act: DynAct,
        backend: str,
        smooth: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(codes.shape[1])
        self.out_features = int(codes.shape[0])
        self.act, self.backend = act, backend
        self.weight = PackedWeight(codes, w_scale, backend)
        self.dtype = code_dtype(backend)
        # the stored codes are x_q + offset (uint8 for oneDNN, int8 for _int_mm)
        self.offset = ActQ(1.0, 0, act.qmin, act.qmax).offset(self.dtype)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if smooth is not None:
            smooth = smooth.detach().float().reshape(-1).to(codes.device)
            if smooth.numel() != self.in_features:
                raise ConfigError(
                    f"{smooth.numel()} smoothing factors for {self.in_features} input channels"
                )
        self.register_buffer("smooth", smooth)
        #: native row kernels (eager, CPU): quantization bit-exact with the torch ops, the
        #: GEMM's epilogue in one pass
        self.native = backend != "reference" and native.available()
        # sum_k c[n, k] * w_n: the zero-point correction of asymmetric rows
        self.register_buffer("wsum", self.weight.row_sum.float() * self.weight.scale)

    @classmethod
    def from_quant(cls, m: nn.Module, backend: str) -> tuple[DynamicInt8Linear | None, str]:
        """The integer version of a ``QuantLinear`` with a dynamic input, or ``(None, reason)``."""
        act, why = dyn_from_quantizer(getattr(m, "input_quantizer", None))
        if act is None:
            return None, f"input: {why}"
        oq = getattr(m, "output_quantizer", None)
        if oq is not None and oq.enabled:
            return None, "after-GEMM quantizer with a per-token dynamic input"
        codes, scale, why = weight_codes(getattr(m, "weight_quantizer", None), m.weight)
        if codes is None:
            return None, why
        smooth = getattr(m, "_buffers", {}).get("smooth_scale")
        if smooth is not None and smooth.numel() != m.weight.shape[1]:
            return None, "smooth_scale does not match the input channels"
        return cls(codes, scale, m.bias, act, backend, smooth), ""

    def quantize_input(self, x: Tensor) -> DynCodes:
        """The codes of the rows of ``x`` (divided by the smoothing factors, if any)."""
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)
        if self.smooth is not None:
            x2 = x2.float() / self.smooth
        return self.row_codes(x2, lead)

    def row_codes(self, x2: Tensor, lead: tuple[int, ...], mul: float = 1.0) -> DynCodes:
        """The codes of the rows ``x2 [M, K]`` (already smoothed) of an input shaped
        ``[*lead, K]``; int32 ``x2`` (integer products) stands for ``torch.mul(x2, mul)``."""
        if self._fast(x2):
            a = self.act
            codes, s, z = rows.row_quant(
                x2, a.qmin, a.qmax, self.offset, a.symmetric, a.qdiv, a.clip, self.dtype, mul=mul
            )
            return DynCodes(codes, s, z, lead)
        x2 = torch.mul(x2, mul).float() if x2.dtype == torch.int32 else x2.float()
        s, z = self.act.grid(x2)
        q = torch.round(x2 / s).add_(z).clamp_(self.act.qmin, self.act.qmax)
        if self.offset:
            q = q.add_(self.offset)
        return DynCodes(q.to(self.dtype), s, z, lead)

    def _fast(self, x: Tensor) -> bool:
        """Use the native row kernels on ``x`` (eager, CPU)."""
        return self.native and x.device.type == "cpu" and not torch.compiler.is_compiling()

    def forward_codes(
        self,
        c: DynCodes,
        *,
        bias: Tensor | None = None,
        other: Tensor | None = None,
        w_scale: Tensor | None = None,
        post: str = "none",
        gelu_approximate: str = "none",
        out: ActQ | None = None,
        out_dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``post(s_m * w_n * (x_q c^T - z_m sum c) + bias) + other`` in ``out_dtype``, or its
        codes on ``out``'s grid stored as ``out_dtype`` (uint8/int8); ``w_scale`` replaces the
        weight scale (a folded LayerScale, or the q/k/v grids folded into ``qkv``).

        Eager on a CPU with the native kernels, everything after the GEMM is one pass
        (:func:`~vitquant.runtime.rows.row_epilogue`; GELU, when asked for, is torch's)."""
        ws = self.weight.scale if w_scale is None else w_scale
        if self.backend == "reference":
            acc = (c.codes.double() - self.offset) @ self.weight.codes.double().t()
            acc = acc - c.zero_point.double() * self.weight.row_sum.double()
            y = (acc * ws.double() * c.scale.double()).float()
        else:
            y = int8_linear(c.codes, 1.0, self.offset, self.weight, w_scale=w_scale)
            wsum = None
            if not self.act.symmetric:
                wsum = self.wsum if w_scale is None else self.weight.row_sum.float() * ws
            if self._fast(y):
                return self._native_epilogue(
                    y, c, wsum, bias, other, post, gelu_approximate, out, out_dtype
                )
            if wsum is not None:
                y = y.sub_(c.zero_point * wsum)
            y = y.mul_(c.scale)
        if bias is not None:
            y = y.add_(bias)
        return self._tail(y, c, other, post, gelu_approximate, out, out_dtype)

    def gelu_codes(self, c: DynCodes, nxt: DynamicInt8Linear) -> DynCodes | None:
        """``nxt.quantize_input(gelu(self(c)))`` (erf GELU, bias included) in one native pass
        (:func:`~vitquant.runtime.rows.row_epilogue_gelu_quant`), or None where that kernel
        does not run (then the caller takes the unfused route)."""
        if self.backend == "reference" or not self._fast(c.codes) or not nxt._fast(c.codes):
            return None
        y = int8_linear(c.codes, 1.0, self.offset, self.weight).reshape(-1, self.out_features)
        a = nxt.act
        codes, s, z = rows.row_epilogue_gelu_quant(
            y, c.scale, zero_point=None if self.act.symmetric else c.zero_point,
            wsum=None if self.act.symmetric else self.wsum, bias=self.bias, div=nxt.smooth,
            qmin=a.qmin, qmax=a.qmax, offset=nxt.offset, symmetric=a.symmetric, qdiv=a.qdiv,
            clip=a.clip, dtype=nxt.dtype,
        )  # fmt: skip
        return DynCodes(codes, s, z, c.lead)

    def _tail(
        self,
        y: Tensor,
        c: DynCodes,
        other: Tensor | None,
        post: str,
        gelu_approximate: str,
        out: ActQ | None,
        out_dtype: torch.dtype,
    ) -> Tensor:
        """GELU, the residual and the output's dtype or grid, on the float result ``y``."""
        if post == "gelu":
            y = F.gelu(y, approximate=gelu_approximate)
        y = y.reshape(*c.lead, self.out_features)
        if other is not None:
            y = y + other
        if out is not None:
            return quantize_act(y, out, out_dtype)
        return y.to(out_dtype)

    def _native_epilogue(
        self,
        y: Tensor,
        c: DynCodes,
        wsum: Tensor | None,
        bias: Tensor | None,
        other: Tensor | None,
        post: str,
        gelu_approximate: str,
        out: ActQ | None,
        out_dtype: torch.dtype,
    ) -> Tensor:
        z = None if wsum is None else c.zero_point
        y = y.reshape(-1, self.out_features)
        if out is not None and post == "none" and other is None:
            # the grid's 1 / scale and zero point folded into the row scales and the bias
            # (exactly the torch path's codes when the grid is (1, 0), as for q/k/v)
            shift = out.zero_point + out.offset(out_dtype)
            b = torch.zeros(self.out_features) if bias is None else bias
            if out.scale != 1.0:
                b = b / out.scale
            lo, hi = out.qmin + out.offset(out_dtype), out.qmax + out.offset(out_dtype)
            codes = rows.row_epilogue(
                y, c.scale if out.scale == 1.0 else c.scale / out.scale, zero_point=z,
                wsum=wsum, bias=b + shift if shift else b, out_dtype=out_dtype, lo=lo, hi=hi,
            )  # fmt: skip
            return codes.reshape(*c.lead, self.out_features)
        if post == "none" and out is None and out_dtype in (torch.float32, torch.bfloat16):
            res = None if other is None else other.reshape(-1, self.out_features)
            y = rows.row_epilogue(
                y, c.scale, zero_point=z, wsum=wsum, bias=bias, other=res, out_dtype=out_dtype
            )
            return y.reshape(*c.lead, self.out_features)
        y = rows.row_epilogue(y, c.scale, zero_point=z, wsum=wsum, bias=bias)
        return self._tail(y, c, other, post, gelu_approximate, out, out_dtype)

    def float_from_codes(self, c: DynCodes) -> Tensor:
        """Float output from quantized input (bias included)."""
        return self.forward_codes(c, bias=self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.float_from_codes(self.quantize_input(x))

    def extra_repr(self) -> str:
        sym = "sym" if self.act.symmetric else "asym"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"backend={self.backend}, per-token {self.act.bits}-bit {sym}, clip={self.act.clip:g}, "
            f"smoothed={self.smooth is not None}"
        )

"""Integer modules that replace calibrated fake-quant modules one for one.

* :class:`Int8Linear` replaces a ``QuantLinear`` whose input and weight quantizers are uniform
  and at most 8 bits (weights per tensor or per output channel; 2..8-bit weights all run on the
  int8 kernels, unpacked once). With an after-GEMM ``output_quantizer`` (FasterTransformer's ft2)
  the GEMM result is requantized to int8 in the kernel's epilogue and the bias added after it,
  as the fake-quant module computes. A ``smooth_scale`` (SmoothQuant's per-input-channel factor
  ``s``, the input divided by it before the quantizer) is folded into the input quantization:
  ``round(x / (s * scale))``, one pass as without it, and the GEMM stays per-tensor int8.
* :class:`Int8MatMul` replaces a ``QuantMatMul`` (q·kᵀ, attn·v) with both operands quantized:
  all heads in one exact integer product (:func:`~vitquant.runtime.kernels.int8_bmm`: int8 GEMMs
  per head on the CPU, one batched GEMM on CUDA), int32 accumulation, float output.

Quantizers are read through their ``qparams()`` (the :class:`~vitquant.quant.QParams` contract)
and converted with :func:`act_from_quantizer` / :func:`weight_codes`, which return None (with a
reason) when the integer kernels cannot run that quantizer; ``lower`` then keeps the fake-quant
module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.runtime.kernels import (
    ActQ,
    PackedWeight,
    int8_bmm,
    int8_linear,
    quantize_act,
    quantize_fast,
)

__all__ = [
    "act_from_quantizer",
    "fits_8bit",
    "weight_codes",
    "code_dtype",
    "rescale",
    "Int8Linear",
    "Int8MatMul",
]


def _is_active(q: object) -> bool:
    return (
        q is not None
        and bool(getattr(q, "enabled", False))
        and bool(getattr(q, "is_calibrated", False))
    )


def fits_8bit(qmin: int, qmax: int) -> bool:
    """True when the grid ``[qmin, qmax]`` is stored in int8 or uint8."""
    return (-128 <= qmin and qmax <= 127) or (0 <= qmin and qmax <= 255)


def act_from_quantizer(q: nn.Module | None) -> tuple[ActQ | None, str]:
    """The :class:`ActQ` of an activation quantizer, or ``(None, reason)``."""
    if not _is_active(q):
        return None, "not quantized"
    qp = q.qparams()  # type: ignore[union-attr,operator]
    if qp.kind != "uniform":
        return None, f"{qp.kind} quantizer"
    if qp.axis is not None or qp.scale.numel() != 1:
        return None, "per-channel activation scales"
    if not fits_8bit(qp.qmin, qp.qmax):
        return None, f"{qp.bits}-bit activations do not fit in 8 bits"
    zp = float(qp.zero_point.reshape(-1)[0])
    return ActQ(float(qp.scale.reshape(-1)[0]), int(round(zp)), int(qp.qmin), int(qp.qmax)), ""


def weight_codes(q: nn.Module | None, weight: Tensor) -> tuple[Tensor | None, Tensor, str]:
    """``(codes int8 [N, K], scale [N], "")`` of a weight quantizer, or ``(None, _, reason)``.

    The codes are ``x_q - zero_point`` with ``x_q`` the quantizer's
    :meth:`~vitquant.quant.quantizers.base.Quantizer.int_codes` (the codes its fake-quant forward
    uses, frozen VVTQ weights included); they must fit in int8 (any symmetric grid of up to 8
    bits does). Per-tensor and per-output-channel (axis 0) scales are supported.
    """
    empty = torch.empty(0)
    if not _is_active(q):
        return None, empty, "weight not quantized"
    qp = q.qparams()  # type: ignore[union-attr,operator]
    if qp.kind != "uniform":
        return None, empty, f"{qp.kind} weight quantizer"
    n = weight.shape[0]
    if qp.axis is None or qp.scale.numel() == 1:
        scale = qp.scale.reshape(1).float().expand(n)
        zp = qp.zero_point.reshape(1).float().expand(n)
    elif qp.axis % weight.dim() == 0 and qp.scale.numel() == n and qp.group_size is None:
        scale, zp = qp.scale.reshape(n).float(), qp.zero_point.reshape(n).float()
    else:
        return None, empty, "per-group or per-input-channel weight scales"
    with torch.no_grad():
        x_q = q.int_codes(weight.detach())  # type: ignore[union-attr,operator]
    codes = x_q.reshape(n, -1) - zp.to(x_q.device)[:, None]
    if codes.numel() and (codes.min() < -128 or codes.max() > 127):
        return None, empty, f"{qp.bits}-bit weight codes do not fit in int8"
    return codes.to(torch.int8), scale.contiguous(), ""


def code_dtype(backend: str) -> torch.dtype:
    """Storage dtype of activation codes for a backend (oneDNN runs fast on uint8)."""
    return torch.uint8 if backend == "onednn" else torch.int8


class Int8Linear(nn.Module):
    """Linear layer on an int8 GEMM: quantize the input, integer GEMM, float (or int8) out.

    Args:
        codes: int8 weight codes ``[N, K]``.
        w_scale: float ``[N]``.
        bias: float ``[N]`` or None.
        act: the input quantizer.
        backend: ``"onednn" | "intmm" | "reference"``.
        out_q: after-GEMM quantizer (applied before the bias), or None.
        smooth: per-input-channel smoothing factors ``s`` ``[K]`` (the input is ``x / s``
            before ``act``), or None.

    Attributes:
        in_div: ``s * act.scale`` (float ``[K]``), the divisor that quantizes a smoothed input
            in one pass, or None without smoothing.
    """

    dynamic = False  # fixed input scale (see vitquant.runtime.dynamic for per-token ones)

    def __init__(
        self,
        codes: Tensor,
        w_scale: Tensor,
        bias: Tensor | None,
        act: ActQ,
        backend: str,
        out_q: ActQ | None = None,
        smooth: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(codes.shape[1])
        self.out_features = int(codes.shape[0])
        self.act = act
        self.out_q = out_q
        self.backend = backend
        self.weight = PackedWeight(codes, w_scale, backend)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        div = None
        if smooth is not None:
            s = smooth.detach().float().reshape(-1)
            if s.numel() != self.in_features:
                raise ConfigError(
                    f"{s.numel()} smoothing factors for {self.in_features} input channels"
                )
            div = (s * act.scale).to(codes.device)
        self.register_buffer("in_div", div)
        self.dtype = code_dtype(backend)

    @classmethod
    def from_quant(cls, m: nn.Module, backend: str) -> tuple[Int8Linear | None, str]:
        """Builds the integer version of a ``QuantLinear``, or ``(None, reason)``."""
        act, why = act_from_quantizer(getattr(m, "input_quantizer", None))
        if act is None:
            return None, f"input: {why}"
        codes, scale, why = weight_codes(getattr(m, "weight_quantizer", None), m.weight)
        if codes is None:
            return None, why
        out_q = None
        oq = getattr(m, "output_quantizer", None)
        if oq is not None and oq.enabled:
            out_q, why = act_from_quantizer(oq)
            if out_q is None:
                return None, f"output: {why}"
        smooth = getattr(m, "_buffers", {}).get("smooth_scale")
        if smooth is not None and smooth.numel() != m.weight.shape[1]:
            return None, "smooth_scale does not match the input channels"
        return cls(codes, scale, m.bias, act, backend, out_q, smooth), ""

    def quantize_input(self, x: Tensor) -> Tensor:
        """Codes of ``x`` (divided by the smoothing factors, if any) in the storage dtype: one
        pass (:func:`~vitquant.runtime.kernels.quantize_fast`) but on the reference backend."""
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        if self.backend != "reference" and self.in_div is None:
            return quantize_fast(x, self.act, self.dtype)
        return quantize_act(x, self.act, self.dtype, div=self.in_div)

    @property
    def x_zp(self) -> int:
        """Zero point of the stored input codes."""
        return self.act.zero_point + self.act.offset(self.dtype)

    def forward_codes(self, xq: Tensor, **kw: object) -> Tensor:
        """:func:`~vitquant.runtime.kernels.int8_linear` on already quantized input codes."""
        return int8_linear(xq, self.act.scale, self.x_zp, self.weight, **kw)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return self.float_from_codes(self.quantize_input(x))

    def float_from_codes(self, xq: Tensor) -> Tensor:
        """Float output from input codes (after-GEMM quantization and bias included)."""
        if self.out_q is None:
            return self.forward_codes(xq, bias=self.bias)
        codes = self.forward_codes(xq, out=self.out_q, out_dtype=torch.int8)
        y = (codes.float() - self.out_q.zero_point) * self.out_q.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"backend={self.backend}, int8_out={self.out_q is not None}, "
            f"smoothed={self.in_div is not None}"
        )


def linear_output(
    lin: nn.Module,
    xq: Tensor,
    bias: Tensor | None,
    w_scale: Tensor | None,
    residual: Tensor | None,
    float_dtype: torch.dtype,
) -> Tensor:
    """The float output of an integer linear (:class:`Int8Linear` or ``DynamicInt8Linear``) on
    input codes ``xq``, plus ``residual``: in the GEMM's epilogue (with ``bias`` and the weight
    scales ``w_scale``, LayerScale folded in) without an after-GEMM quantizer; else requantized
    to its int8 grid (ft2), then the bias and the residual added in float, as the fake quant."""
    oq = lin.out_q
    if oq is None:
        return lin.forward_codes(
            xq, bias=bias, other=residual, w_scale=w_scale, out_dtype=float_dtype
        )
    codes = lin.forward_codes(xq, out=oq, out_dtype=torch.int8)
    y = (codes.float() - oq.zero_point) * oq.scale
    if lin.bias is not None:
        y = y + lin.bias
    return y if residual is None else residual + y


def rescale(acc: Tensor, scale: float) -> Tensor:
    """``acc * scale`` as float32, ``acc`` an integer product (int32, exact float32, or the
    reference backend's float64, multiplied before rounding). An int32 tensor times a float runs
    ATen's scalar dynamic-cast loop; converting first and scaling in place runs two vectorised
    passes, several times faster."""
    if acc.dtype == torch.float64:
        return torch.mul(acc, scale).float()
    if acc.dtype == torch.float32:
        return acc.mul_(scale)
    return acc.to(torch.float32).mul_(scale)


class Int8MatMul(nn.Module):
    """``a @ b`` on int8 operands with int32 accumulation (q·kᵀ and attn·v).

    Args:
        a, b: the operand quantizers.
        backend: ``"reference"`` (exact float64) or anything else
            (:func:`~vitquant.runtime.kernels.int8_bmm`, int32).
        output_quantizer: applied to the float result (None in every preset).
        method: :func:`~vitquant.runtime.kernels.int_bmm`'s method (None: by device; ``lower``
            picks it by the CPU's ISA, see :mod:`vitquant.runtime.isa`).
        bf16: batched method on the CPU in bfloat16 (exact; AMX).
    """

    def __init__(
        self,
        a: ActQ,
        b: ActQ,
        backend: str,
        output_quantizer: nn.Module | None = None,
        *,
        method: str | None = None,
        bf16: bool = False,
    ) -> None:
        super().__init__()
        self.a, self.b, self.backend = a, b, backend
        self.output_quantizer = output_quantizer
        self.method, self.bf16 = method, bf16

    @classmethod
    def from_quant(
        cls, m: nn.Module, backend: str, *, method: str | None = None, bf16: bool = False
    ) -> tuple[Int8MatMul | None, str]:
        """Builds the integer version of a ``QuantMatMul``, or ``(None, reason)``."""
        a, why_a = act_from_quantizer(getattr(m, "a_quantizer", None))
        b, why_b = act_from_quantizer(getattr(m, "b_quantizer", None))
        if a is None or b is None:
            return None, f"operand a: {why_a}" if a is None else f"operand b: {why_b}"
        oq = getattr(m, "output_quantizer", None)
        out = cls(a, b, backend, oq if _is_active(oq) else None, method=method, bf16=bf16)
        return out, ""

    def quantize(self, x: Tensor, a: ActQ) -> Tensor:
        """int8 codes of one operand (one pass but on the reference backend)."""
        if self.backend == "reference":
            return quantize_act(x, a, torch.int8)
        return quantize_fast(x, a, torch.int8)

    def product(self, aq: Tensor, bq: Tensor) -> Tensor:
        """The integer product of stored codes (zero points corrected)."""
        a_zp = self.a.zero_point + self.a.offset(torch.int8)
        b_zp = self.b.zero_point + self.b.offset(torch.int8)
        return int8_bmm(
            aq, a_zp, bq, b_zp, self.backend, method=self.method, bf16=self.bf16,
            float_out=self.method == "batched",
        )  # fmt: skip

    def scores(self, a: Tensor, b: Tensor) -> Tensor:
        """The integer product (int32, or float64 for the reference backend)."""
        return self.product(self.quantize(a, self.a), self.quantize(b, self.b))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        y = rescale(self.scores(a, b), self.a.scale * self.b.scale)
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, method={self.method}, bf16={self.bf16}"

"""The export-time stand-ins for quantizers in the ONNX export of
:func:`vitquant.export.onnx.qdq_module`.

:class:`_QDQActivation` (``QuantizeLinear [-> Clip] -> DequantizeLinear`` on its input),
:class:`_DQWeight` (the weight's integer codes -> ``DequantizeLinear``) and :class:`_FloatPoint`
(a point left float) replace the quantizers of the exported copy. Each computes in eager mode
what its ONNX nodes compute, and emits them for both exporters: the torchscript one through the
``symbolic`` of an ``autograd.Function`` (:class:`_QDQFunction`, :class:`_DQFunction`), the
dynamo one through ``torch.onnx.ops.symbolic``. Their scales and zero points come from
:meth:`Quantizer.qparams` (:func:`_grid`), as :class:`~vitquant.export.onnx_plan.QDQPoint`
describes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.export.onnx_plan import QDQPoint
from vitquant.quant.quantizers import Quantizer


def _bshape(t: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """``t`` ([] or [C]) shaped to broadcast against ``x`` along ``axis``."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


class _QDQFunction(torch.autograd.Function):
    """Quantize-dequantize; ``symbolic``: QuantizeLinear [-> Clip] -> DequantizeLinear."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, scale: Tensor, zp: Tensor, axis: int | None, lo: int, hi: int,
        clip: bool,
    ) -> Tensor:  # fmt: skip
        s, z = _bshape(scale, x, axis), _bshape(zp, x, axis).float()
        return ((torch.clamp(torch.round(x / s) + z, lo, hi) - z) * s).to(x.dtype)

    @staticmethod
    def symbolic(
        g: Any, x: Any, scale: Any, zp: Any, axis: int | None, lo: int, hi: int, clip: bool
    ) -> Any:
        kw = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zp, **kw)
        if clip:
            dt = torch.int8 if lo < 0 else torch.uint8
            bounds = [g.op("Constant", value_t=torch.tensor(v, dtype=dt)) for v in (lo, hi)]
            q = g.op("Clip", q, *bounds)
        return g.op("DequantizeLinear", q, scale, zp, **kw)


class _DQFunction(torch.autograd.Function):
    """Dequantize stored codes; its ``symbolic`` is ONNX DequantizeLinear on the initializer."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, codes: Tensor, scale: Tensor, zp: Tensor, axis: int | None, block: int | None
    ) -> Tensor:
        s, z = _expand_block(scale, codes, axis, block), _expand_block(zp, codes, axis, block)
        return (codes.float() - z.float()) * s

    @staticmethod
    def symbolic(
        g: Any, codes: Any, scale: Any, zp: Any, axis: int | None, block: int | None
    ) -> Any:
        kw: dict[str, int] = {} if axis is None else {"axis_i": axis}
        if block is not None:
            kw["block_size_i"] = block
        return g.op("DequantizeLinear", codes, scale, zp, **kw)


def _expand_block(t: Tensor, codes: Tensor, axis: int | None, block: int | None) -> Tensor:
    if block is None:
        return _bshape(t, codes, axis)
    assert axis is not None
    return t.repeat_interleave(block, dim=axis)


def _dynamo_exporting() -> bool:
    return bool(torch.onnx.is_in_onnx_export()) and not torch.jit.is_tracing()


class _ExportQuantizer(nn.Module):
    """Base of the modules that stand in for quantizers in the exported copy.

    It answers the attributes the quantized modules read (``active``, ``calibrating``, ...).
    """

    enabled = True
    calibrating = False
    is_calibrated = True
    active = True

    def __init__(self, p: QDQPoint, scale: Tensor, zero_point: Tensor) -> None:
        super().__init__()
        self.info = p
        dtype = torch.int8 if p.dtype == "int8" else torch.uint8
        scale = scale.detach().float().cpu()
        zp = torch.clamp(torch.round(zero_point.detach().float().cpu()), p.qmin, p.qmax)
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise ConfigError(f"quantizer {p.name} has a non-positive or non-finite scale")
        if p.block_size is None:
            scale = scale.reshape(-1) if p.axis is not None else scale.reshape(())
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp.reshape(scale.shape).to(dtype))
        self.dtype = dtype

    def _axis(self, x: Tensor) -> int | None:
        return None if self.info.axis is None else self.info.axis % x.dim()


class _QDQActivation(_ExportQuantizer):
    """QuantizeLinear [-> Clip] -> DequantizeLinear on its input."""

    def forward(self, x: Tensor) -> Tensor:
        p, axis = self.info, self._axis(x)
        scale, zp = self.scale, self.zero_point
        if axis is not None and scale.numel() != x.shape[axis]:
            raise ConfigError(
                f"{p.name}: {scale.numel()} scales for {x.shape[axis]} channels on axis {axis}"
            )
        if not _dynamo_exporting():
            return _QDQFunction.apply(x, scale, zp, axis, p.qmin, p.qmax, p.clip)
        ops = torch.onnx.ops
        attrs = {} if axis is None else {"axis": axis}
        q = ops.symbolic("QuantizeLinear", (x, scale, zp), attrs, dtype=self.dtype, shape=x.shape)
        if p.clip:
            lo = torch.tensor(p.qmin, dtype=self.dtype)
            hi = torch.tensor(p.qmax, dtype=self.dtype)
            q = ops.symbolic("Clip", (q, lo, hi), {}, dtype=self.dtype, shape=x.shape)
        return ops.symbolic("DequantizeLinear", (q, scale, zp), attrs, dtype=x.dtype, shape=x.shape)


class _DQWeight(_ExportQuantizer):
    """The weight's integer codes (a buffer) -> DequantizeLinear; its input is ignored."""

    def __init__(self, p: QDQPoint, q: Quantizer, weight: Tensor) -> None:
        super().__init__(p, *_grid(q))
        with torch.no_grad():
            codes = q.int_codes(weight.detach()).detach().cpu()
        self.register_buffer("codes", codes.to(self.dtype))
        self.out_dtype = weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        if x.shape != self.codes.shape:
            raise ConfigError(
                f"{self.info.name}: the weight changed shape since export began "
                f"({tuple(x.shape)} vs {tuple(self.codes.shape)})"
            )
        axis = None if self.info.axis is None else self.info.axis % self.codes.dim()
        block = self.info.block_size
        if not _dynamo_exporting():
            return _DQFunction.apply(self.codes, self.scale, self.zero_point, axis, block)
        attrs: dict[str, int] = {} if axis is None else {"axis": axis}
        if block is not None:
            attrs["block_size"] = block
        inputs = (self.codes, self.scale, self.zero_point)
        shape = self.codes.shape
        return torch.onnx.ops.symbolic("DequantizeLinear", inputs, attrs, dtype=self.out_dtype,
                                       shape=shape)  # fmt: skip


class _FloatPoint(nn.Module):
    """A quantizer left out of the export (identity; reads as inactive)."""

    enabled = False
    calibrating = False
    is_calibrated = True
    active = False

    def forward(self, x: Tensor) -> Tensor:
        return x


def _grid(q: Quantizer) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` of ``q``'s :class:`QParams`, one per channel for per-head grids
    (the ``group_size`` consecutive channels of a head share its values)."""
    qp = q.qparams()
    scale, zp = qp.scale.reshape(-1), qp.zero_point.reshape(-1)
    if getattr(q.granularity, "kind", "") == "head":
        if qp.group_size is None:
            raise ConfigError(f"{q.name}: per-head scales of unknown channel count")
        scale, zp = scale.repeat_interleave(qp.group_size), zp.repeat_interleave(qp.group_size)
    elif qp.group_size is None:
        return scale.reshape(qp.scale.shape), zp.reshape(qp.scale.shape)
    else:
        return qp.scale, qp.zero_point
    return scale, zp

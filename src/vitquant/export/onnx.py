"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) pairs: :func:`to_onnx`.

A calibrated (PTQ) or QAT-trained fake-quant model becomes an ONNX graph in the "QDQ" format that
onnxruntime, TensorRT and OpenVINO read and fuse into integer kernels (ONNX operators
``QuantizeLinear`` / ``DequantizeLinear``, opset 13+; onnxruntime's QDQ format):

* every enabled activation quantizer (Linear inputs, after-GEMM outputs, q, k, v, the softmax
  input and output, residual and LayerNorm inputs where the preset has them) is a
  ``QuantizeLinear -> DequantizeLinear`` pair on the tensor it quantizes, per tensor (or along
  an axis for per-channel / per-head activation scales);
* every quantized weight is stored as its integer codes (an int8/uint8 initializer) followed by a
  ``DequantizeLinear``, per output channel (``axis=0``) where the quantizer is per channel, else
  per tensor; with opset 21 per-group weights use ``DequantizeLinear``'s ``block_size``.

Scales, zero points and codes come from the quantizer itself: :meth:`Quantizer.qparams` (the
:class:`~vitquant.quant.QParams` contract) and :meth:`Quantizer.int_codes` (frozen VVTQ codes
included). vitquant's grid ``x_q = clamp(round(x / s) + z, qmin, qmax)`` maps onto ONNX exactly:
a signed grid is ``int8`` with zero point ``z``, an unsigned (asymmetric) one ``uint8``; ONNX
rounds half to even as ``torch.round`` does, and divides by the scale as vitquant does. A grid
narrower than its storage type (2..7-bit activations, narrow range ``[-127, 127]``) gets an
integer ``Clip`` between the two nodes, which is exact (``clamp(clamp(q, -128, 127), lo, hi) =
clamp(q, lo, hi)``). LSQ's learned zero point enters rounded, as its forward pass uses it.

What QDQ cannot express: logarithmic quantizers (RepQ-ViT's log-√2 softmax, FQ-ViT's log2) and
codes wider than 8 bits. With ``unsupported="error"`` (the default) :func:`to_onnx` raises a
:class:`~vitquant.errors.ConfigError` naming them; with ``"float"`` those points stay float in
the graph (a warning names them), so the ONNX model is the fake-quant model without them.

Two exporters: ``"torchscript"`` (default; ``torch.onnx.export(dynamo=False)``, about a second
for a small ViT) emits the nodes from an ``autograd.Function``'s ``symbolic``; ``"dynamo"``
(``torch.export``-based, needs ``onnxscript``, opset 18+) emits them with
``torch.onnx.ops.symbolic``. Both write the same QDQ nodes. :mod:`vitquant.export.onnx_run`
counts them in a written file, runs it on onnxruntime's CPU provider and measures its agreement
with the fake-quant model (``docs/onnx.md``).

``onnx`` and ``onnxruntime`` are optional (``pip install 'vitquant[onnx]'``).

Length: just over 500 lines because the two exporters' symbolic functions, the module swap that
routes every quantizer through them and the export entry point share the QDQ parameter mapping;
counting, running and comparing live in :mod:`vitquant.export.onnx_run`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.export.onnx_run import count_qdq, require
from vitquant.quant.modules import QuantModule
from vitquant.quant.quantizers import Quantizer

__all__ = ["QDQPoint", "OnnxExport", "qdq_points", "qdq_module", "to_onnx"]

_EXPORTERS = ("torchscript", "dynamo")
_UNSUPPORTED = ("error", "float")
_DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}


# --- which points become what ------------------------------------------------------------------
@dataclass(frozen=True)
class QDQPoint:
    """One quantizer of the model and how the export writes it.

    Attributes:
        name: the quantizer's module path (``blocks.0.attn.qkv.input_quantizer``).
        point: its point kind (``linear_input``, ``weight``, ``softmax_input``, ...).
        role: ``"weight"`` (int codes + DequantizeLinear) or ``"activation"`` (Q/DQ pair).
        export: ``"qdq"`` or ``"float"`` (left out, see ``reason``).
        dtype: ``"int8"`` or ``"uint8"`` (``""`` when float).
        qmin, qmax: the integer grid; ``clip`` is True when it is narrower than ``dtype``.
        axis: the scale axis (None: per tensor); ``block_size`` for per-group weights.
        reason: why a point stays float.
    """

    name: str
    point: str
    role: str
    export: str
    dtype: str = ""
    qmin: int = 0
    qmax: int = 0
    clip: bool = False
    axis: int | None = None
    block_size: int | None = None
    reason: str = ""


def _weight_params(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """``{id(quantizer): (module, parameter name)}`` for every weight quantizer slot."""
    out: dict[int, tuple[nn.Module, str]] = {}
    for m in model.modules():
        if isinstance(m, QuantModule):
            for slot, pname in m.quant_weights.items():
                q = getattr(m, slot, None)
                if isinstance(q, Quantizer):
                    out[id(q)] = (m, pname)
    return out


def _storage(qmin: int, qmax: int) -> tuple[torch.dtype, int, int] | None:
    """``(dtype, lo, hi)`` of the 8-bit ONNX type holding ``[qmin, qmax]`` (None: none does)."""
    if -128 <= qmin and qmax <= 127 and qmin < 0:
        return torch.int8, -128, 127
    if 0 <= qmin and qmax <= 255:
        return torch.uint8, 0, 255
    return None


def _plan(q: Quantizer, name: str, role: str, opset: int) -> QDQPoint:
    point = q.point or ("weight" if role == "weight" else "")
    if q.kind == "dynamic":
        why = "per-token dynamic scales (QuantizeLinear takes fixed ones)"
        return QDQPoint(name, point, role, "float", reason=why)
    if q.kind != "uniform":
        return QDQPoint(name, point, role, "float", reason=f"{q.kind} quantizer (not affine)")
    qp = q.qparams()
    st = _storage(qp.qmin, qp.qmax)
    if st is None:
        return QDQPoint(name, point, role, "float", reason=f"{qp.bits}-bit codes (> 8 bits)")
    dtype, lo, hi = st
    axis, block = qp.axis, None
    kind = getattr(q.granularity, "kind", "tensor")
    if kind == "group":
        if role != "weight" or opset < 21:
            why = "per-group weights need exporter='dynamo', opset=21"
            why = why if role == "weight" else "per-group activation scales"
            return QDQPoint(name, point, role, "float", reason=why)
        block = qp.group_size
    if kind == "head" and qp.group_size is None:
        return QDQPoint(name, point, role, "float", reason="per-head scales of unknown width")
    clip = (qp.qmin, qp.qmax) != (lo, hi)
    dt = str(dtype).removeprefix("torch.")
    return QDQPoint(name, point, role, "qdq", dt, qp.qmin, qp.qmax, clip, axis, block)


def qdq_points(model: nn.Module, opset: int = 17) -> list[QDQPoint]:
    """How :func:`to_onnx` writes each active quantizer of ``model`` (in module order).

    Disabled quantizers (``enabled=False``, e.g. layers a fallback keeps in float) are not
    listed: the fake-quant model does not quantize there either.

    Raises:
        ConfigError: some enabled quantizers were never calibrated (named).
    """
    weights = _weight_params(model)
    missing = [n for n, q in _quantizers(model) if q.enabled and not q.is_calibrated]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(
            f"cannot export: {len(missing)} quantizer(s) were never calibrated: "
            f"{', '.join(missing[:3])}{more} (run calibrate() or load a trained state)"
        )
    return [
        _plan(q, n, "weight" if id(q) in weights else "activation", opset)
        for n, q in _quantizers(model)
        if q.active
    ]


def _quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    for n, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield n, m


# --- the export-time modules ---------------------------------------------------------------------
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


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def qdq_module(
    model: nn.Module, *, opset: int = 17, unsupported: str = "error"
) -> tuple[nn.Module, list[QDQPoint]]:
    """A copy of ``model`` whose quantizers are replaced by the modules that export as QDQ.

    The copy (eval mode, CPU) computes in eager mode what the ONNX graph computes: each
    activation point ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``, each weight its
    dequantized codes. For calibrated uniform quantizers that is the fake-quant model's
    function exactly. ``model`` itself is not changed.

    Args:
        model: a prepared and calibrated (or QAT-trained) model.
        opset: the ONNX opset the graph will have (21 enables per-group weights).
        unsupported: ``"error"`` or ``"float"`` for points QDQ cannot express (log2 quantizers,
            more than 8 bits): raise, or leave them float with a warning.

    Returns:
        ``(copy, points)``: the points as :func:`qdq_points` describes them.

    Raises:
        ConfigError: the model has no quantizers, some were never calibrated, or some cannot
            be expressed as QDQ and ``unsupported="error"``.
    """
    if unsupported not in _UNSUPPORTED:
        raise ConfigError(f"unsupported={unsupported!r}: use one of {', '.join(_UNSUPPORTED)}")
    if not any(True for _ in _quantizers(model)):
        raise ConfigError("the model has no quantizers: prepare() and calibrate() it first")
    from vitquant.runtime.lower import is_lowered

    if is_lowered(model):
        raise ConfigError("export the fake-quant model to ONNX, not a lowered (int8) one")
    points = qdq_points(model, opset)
    left = [p for p in points if p.export == "float"]
    if left and unsupported == "error":
        first = left[0]
        raise ConfigError(
            f"{len(left)} quantization point(s) cannot be ONNX QDQ, e.g. {first.name} "
            f"({first.reason}); pass unsupported='float' (CLI: --unsupported float) to leave "
            "them float"
        )
    if left:
        warnings.warn(
            f"ONNX export: {len(left)} quantization point(s) stay float, e.g. {left[0].name} "
            f"({left[0].reason})",
            stacklevel=2,
        )
    copy_ = copy.deepcopy(model).cpu().eval()
    by_name = {p.name: p for p in points}
    weights = _weight_params(copy_)
    for name, q in list(_quantizers(copy_)):
        p = by_name.get(name)
        if p is None or p.export == "float":  # disabled (the identity) or left float
            _set(copy_, name, _FloatPoint())
        elif p.role == "weight":
            mod, pname = weights[id(q)]
            _set(copy_, name, _DQWeight(p, q, getattr(mod, pname)))
        else:
            _set(copy_, name, _QDQActivation(p, *_grid(q)))
    return copy_, points


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


# --- export --------------------------------------------------------------------------------
@dataclass
class OnnxExport:
    """What :func:`to_onnx` wrote.

    Attributes:
        path: the ONNX file.
        opset: its opset.
        exporter: ``"torchscript"`` or ``"dynamo"``.
        points: every active quantizer and how it was written (:class:`QDQPoint`).
        counts: :func:`count_qdq` of the written graph.
    """

    path: Path
    opset: int
    exporter: str
    points: list[QDQPoint] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def activation_points(self) -> int:
        return sum(p.export == "qdq" and p.role == "activation" for p in self.points)

    @property
    def weight_points(self) -> int:
        return sum(p.export == "qdq" and p.role == "weight" for p in self.points)

    @property
    def float_points(self) -> list[str]:
        return [p.name for p in self.points if p.export == "float"]

    def summary(self) -> str:
        """One line: file, QDQ pairs, weights, float points."""
        left = f", {len(self.float_points)} left float" if self.float_points else ""
        return (
            f"wrote {self.path} (opset {self.opset}): {self.activation_points} activation "
            f"QuantizeLinear/DequantizeLinear pairs, {self.weight_points} int8 weights with "
            f"DequantizeLinear{left}"
        )


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor,
    *,
    opset: int | None = None,
    exporter: str = "torchscript",
    dynamic_batch: bool = True,
    unsupported: str = "error",
    input_name: str = "input",
    output_name: str = "logits",
) -> OnnxExport:
    """Writes ``model`` (calibrated or QAT-trained fake-quant) as an ONNX QDQ graph.

    Args:
        model: a prepared and calibrated model (``vitquant.prepare`` + ``calibrate`` or a QAT
            run, or ``load_quantized`` / ``load_calibrated``); not changed.
        path: the ``.onnx`` file to write (parent folders are created).
        example_input: one input batch (its shape, with the batch axis dynamic by default).
        opset: ONNX opset (default 17 with torchscript, 18 with dynamo; 21 for per-group
            weights).
        exporter: ``"torchscript"`` (default, fast) or ``"dynamo"`` (needs ``onnxscript``).
        dynamic_batch: make the first axis of input and output dynamic.
        unsupported: ``"error"`` or ``"float"``: see :func:`qdq_module`.
        input_name, output_name: graph input / output names.

    Returns:
        An :class:`OnnxExport` (path, points, node counts).

    Raises:
        ConfigError: see :func:`qdq_module`; an unknown exporter or an opset below 13.
        MissingDependencyError: ``onnx`` (or ``onnxscript`` for dynamo) is not installed.

    Example:
        >>> rep = to_onnx(model, "vit.onnx", torch.randn(1, 3, 224, 224))
        >>> sess = onnx_session(rep.path)
    """
    if exporter not in _EXPORTERS:
        raise ConfigError(f"exporter={exporter!r}: use one of {', '.join(_EXPORTERS)}")
    opset = _DEFAULT_OPSET[exporter] if opset is None else int(opset)
    if opset < 13 or (exporter == "dynamo" and opset < 18):
        raise ConfigError(f"opset {opset} is too old: per-axis QDQ needs 13 (dynamo: 18)")
    if exporter == "torchscript" and opset > 20:
        raise ConfigError(f"opset {opset} needs exporter='dynamo' (torchscript writes 13..20)")
    require("onnx")
    if exporter == "dynamo":
        require("onnxscript")
    if not isinstance(example_input, Tensor):
        raise ConfigError("example_input must be a tensor (one input batch)")
    graph, points = qdq_module(model, opset=opset, unsupported=unsupported)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = example_input.detach().cpu()
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {input_name: {0: "batch"}, output_name: {0: "batch"}}
            torch.onnx.export(
                graph, (x,), str(tmp), dynamo=False, opset_version=opset,
                input_names=[input_name], output_names=[output_name],
                dynamic_axes=axes if dynamic_batch else None,
            )  # fmt: skip
        else:
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                prog = torch.onnx.export(
                    graph, (x,), dynamo=True, opset_version=opset, input_names=[input_name],
                    output_names=[output_name], dynamic_shapes=shapes, verbose=False,
                )  # fmt: skip
            assert prog is not None
            prog.save(str(tmp), external_data=False)
    os.replace(tmp, path)
    return OnnxExport(path, opset, exporter, points, count_qdq(path))

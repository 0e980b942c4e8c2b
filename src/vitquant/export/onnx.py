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

The QDQ plan (:class:`QDQPoint`, :func:`qdq_points`) is in :mod:`vitquant.export.onnx_plan` and
the stand-in modules that emit the nodes for both exporters in :mod:`vitquant.export.onnx_modules`
(both re-exported here); this module swaps them in (:func:`qdq_module`) and writes the file
(:func:`to_onnx`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.export.onnx_modules import _DQWeight, _FloatPoint, _grid, _QDQActivation
from vitquant.export.onnx_plan import QDQPoint, _quantizers, _weight_params, qdq_points
from vitquant.export.onnx_run import count_qdq, require

__all__ = ["QDQPoint", "OnnxExport", "qdq_points", "qdq_module", "to_onnx"]

_EXPORTERS = ("torchscript", "dynamo")
_UNSUPPORTED = ("error", "float")
_DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}


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

"""The QDQ plan of an ONNX export: which quantizers of a model become which ONNX nodes.

:func:`qdq_points` lists every active quantizer as a :class:`QDQPoint`: weights as integer codes
with a ``DequantizeLinear`` (per output channel, per tensor, or per group with opset 21's
``block_size``), activations as ``QuantizeLinear -> DequantizeLinear`` pairs (with an integer
``Clip`` where the grid is narrower than ``int8``/``uint8``), and the points QDQ cannot express
(dynamic, logarithmic, wider than 8 bits) left ``"float"`` with the reason. Used by
:func:`vitquant.export.onnx.qdq_module` and :func:`vitquant.export.onnx.to_onnx`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vitquant.errors import ConfigError
from vitquant.quant.modules import QuantModule
from vitquant.quant.quantizers import Quantizer

__all__ = ["QDQPoint", "qdq_points"]


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

"""Reading and running ONNX QDQ graphs: :func:`count_qdq`, :func:`onnx_session`,
:func:`run_onnx`, :func:`compare_onnx`.

The checks of ``docs/onnx.md``: the QDQ structure of a graph written by
:func:`vitquant.export.onnx.to_onnx` (QuantizeLinear -> [Clip ->] DequantizeLinear pairs on
activations, DequantizeLinear on integer weight initializers), and its logits on onnxruntime's
CPU provider against the fake-quant model. ``optimize=True`` is the deployment path (onnxruntime
fuses the QDQ nodes into its integer kernels: ``QLinearMatMul``, ``MatMulIntegerToFloat``,
``QLinearSoftmax``, ...); ``optimize=False`` runs every node as written, a float emulation of the
graph that equals the fake-quant model up to float rounding.

``onnx`` and ``onnxruntime`` are optional (``pip install 'vitquant[onnx]'``): :func:`require`
raises a :class:`~vitquant._optional.MissingDependencyError` naming the extra.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant._optional import MissingDependencyError

__all__ = ["require", "count_qdq", "onnx_session", "run_onnx", "compare_onnx"]


def require(module: str) -> Any:
    """Imports an optional package of the ``onnx`` extra, or raises naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        base = torch.__version__.split("+")[0]
        raise MissingDependencyError(
            f"{module} is not installed: pip install 'vitquant[onnx]' 'torch=={base}'"
        ) from None


def count_qdq(model: Any) -> dict[str, int]:
    """Counts the QDQ structure of an ONNX graph (a path or a ``ModelProto``).

    Returns:
        ``{"quantize", "dequantize", "qdq_pairs", "weight_dequantize", "clip"}``:
        ``qdq_pairs`` counts QuantizeLinear nodes whose output reaches a DequantizeLinear (directly
        or through one integer Clip), ``weight_dequantize`` DequantizeLinear nodes on an integer
        initializer (or Constant), ``clip`` the Clips between the two.
    """
    onnx = require("onnx")
    proto = onnx.load(str(model)) if isinstance(model, (str, os.PathLike)) else model
    g = proto.graph
    consts = {i.name for i in g.initializer}
    consts |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    counts = dict.fromkeys(("quantize", "dequantize", "qdq_pairs", "weight_dequantize", "clip"), 0)
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            counts["quantize"] += 1
            nxt = consumers.get(n.output[0], [])
            clips = [c for c in nxt if c.op_type == "Clip"]
            if clips:
                counts["clip"] += 1
                nxt = [d for c in clips for d in consumers.get(c.output[0], [])]
            if nxt and all(c.op_type == "DequantizeLinear" for c in nxt):
                counts["qdq_pairs"] += 1
        elif n.op_type == "DequantizeLinear":
            counts["dequantize"] += 1
            if n.input[0] in consts:
                counts["weight_dequantize"] += 1
    return counts


def onnx_session(
    path: str | os.PathLike[str], threads: int | None = None, *, optimize: bool = True
) -> Any:
    """An onnxruntime ``InferenceSession`` on the CPU provider.

    Args:
        path: the ONNX file.
        threads: intra-op threads (None: onnxruntime's default).
        optimize: onnxruntime's graph optimizations (which fuse QDQ into integer kernels); False
            runs every node as written (float emulation of the QDQ graph).
    """
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, x: Tensor) -> Tensor:
    """Runs a session (or a path) on ``x``; returns the first output as a float tensor."""
    if isinstance(session, (str, os.PathLike)):
        session = onnx_session(session)
    name = session.get_inputs()[0].name
    out = session.run(None, {name: x.detach().cpu().float().numpy()})[0]
    return torch.from_numpy(out)


def compare_onnx(
    model: nn.Module, path: str | os.PathLike[str], x: Tensor, *, optimize: bool = True
) -> dict[str, float]:
    """Agreement of the ONNX graph on onnxruntime with the fake-quant ``model`` on ``x``.

    Returns:
        ``{"cosine", "top1_agreement", "max_abs_diff", "max_abs_logit"}``: cosine similarity of
        the flattened logits, the fraction of rows with the same arg-max, and the largest
        absolute difference.
    """
    was = model.training
    model.eval()
    with torch.no_grad():
        ref = model(x).float().cpu()
    model.train(was)
    out = run_onnx(onnx_session(path, optimize=optimize), x)
    if isinstance(ref, tuple):  # pragma: no cover - distilled models in train mode only
        ref = ref[0]
    return {
        "cosine": float(F.cosine_similarity(out.flatten(), ref.flatten(), dim=0)),
        "top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
        "max_abs_diff": float((out - ref).abs().max()),
        "max_abs_logit": float(ref.abs().max()),
    }

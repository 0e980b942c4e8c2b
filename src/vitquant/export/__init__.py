"""Packed low-bit export: bit packing (:mod:`.bitpack`) and quantized checkpoints (``io.py``);
ONNX QDQ graphs for onnxruntime / TensorRT / OpenVINO (:mod:`.onnx`); ``torch.export`` programs
of fake-quant and lowered int8 models (:mod:`.torch_export`)."""

from __future__ import annotations

from vitquant.export.onnx import OnnxExport, to_onnx
from vitquant.export.onnx_run import compare_onnx, count_qdq, onnx_session, run_onnx
from vitquant.export.torch_export import export_program, load_program, save_program
from vitquant.quant.bitpack import pack, pack_signed, packed_nbytes, unpack, unpack_signed

__all__ = [
    "pack",
    "unpack",
    "pack_signed",
    "unpack_signed",
    "packed_nbytes",
    "to_onnx",
    "OnnxExport",
    "count_qdq",
    "onnx_session",
    "compare_onnx",
    "run_onnx",
    "export_program",
    "save_program",
    "load_program",
]

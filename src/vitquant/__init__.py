"""vitquant: quantization for vision transformers.

Post-training quantization (FasterTransformer's calibrators and presets, RepQ-ViT-style
reparameterisation, log2 softmax quantizers), quantization-aware training (LSQ, Q-ViT, VVTQ,
FasterTransformer QAT with distillation), DiffQ's differentiable bit allocation, packed low-bit
export and real int8 inference, behind one quantizer interface.
"""

from __future__ import annotations

from vitquant import methods as _methods  # noqa: F401  (registers every method's names)
from vitquant._version import __version__
from vitquant.errors import CheckpointError, ConfigError, DataError, VitquantError
from vitquant.export.io import load_quantized, save_quantized
from vitquant.models import create_model, list_models, register_model
from vitquant.quant import (
    QuantConfig,
    calibrate,
    compute_amax,
    enable_quantization,
    format_summary,
    load_calibrated,
    prepare,
    quant_summary,
    quantization_disabled,
    save_calibrated,
)
from vitquant.runtime import lower, lowering_report, measure_speedup

__all__ = [
    "__version__",
    "VitquantError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "create_model",
    "list_models",
    "register_model",
    "QuantConfig",
    "prepare",
    "calibrate",
    "compute_amax",
    "quant_summary",
    "format_summary",
    "enable_quantization",
    "quantization_disabled",
    "save_calibrated",
    "load_calibrated",
    "save_quantized",
    "load_quantized",
    "lower",
    "lowering_report",
    "measure_speedup",
]

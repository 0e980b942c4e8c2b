"""vitquant: quantization for vision transformers.

Post-training quantization (FasterTransformer's calibrators and presets, RepQ-ViT-style
reparameterisation, log2 softmax quantizers), quantization-aware training (LSQ, Q-ViT, VVTQ,
FasterTransformer QAT with distillation), DiffQ's differentiable bit allocation, packed low-bit
export and real int8 inference, behind one quantizer interface.
"""

from __future__ import annotations

from .errors import CheckpointError, ConfigError, DataError, VitquantError
from .models import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "VitquantError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "create_model",
    "list_models",
    "register_model",
]

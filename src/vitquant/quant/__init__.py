"""Quantization: quantizers, quantized modules, configs/presets and the PTQ workflow.

Typical use::

    from vitquant.quant import QuantConfig, prepare, calibrate, quant_summary, format_summary
    model = prepare(model, QuantConfig(preset="ft2", wbits=8, abits=8))
    calibrate(model, loader, method="percentile", percentile=99.99, num_batches=20)
    print(format_summary(quant_summary(model)))

Presets follow NVIDIA FasterTransformer's ViT example (ft1/ft2/ft3/trt); ``repq`` adds the
ViT-specific PTQ of RepQ-ViT (log-sqrt2 softmax, LayerNorm reparameterisation).
"""

from __future__ import annotations

from vitquant._deprecated import forward
from vitquant.quant.api import (
    batch_input,
    calibrate,
    enable_quantization,
    get_config,
    named_quantizers,
    prepare,
    quantization_disabled,
)
from vitquant.quant.calibrated_io import load_calibrated, save_calibrated
from vitquant.quant.calibrators import compute_amax
from vitquant.quant.config import QuantConfig
from vitquant.quant.modules import (
    QuantAdd,
    QuantAttention,
    QuantBlock,
    QuantConv2d,
    QuantLayerNorm,
    QuantLinear,
    QuantMatMul,
    QuantMultiheadAttention,
    QuantSoftmax,
    QuantTransformerEncoderLayer,
)
from vitquant.quant.presets import POINT_KINDS, PRESETS
from vitquant.quant.quantizers import QUANTIZERS, QParams, Quantizer, UniformQuantizer
from vitquant.quant.summary import format_summary, quant_summary

# moved to vitquant.methods.repq (RepQ-ViT's package); forwarded until vitquant 0.3
__getattr__ = forward(
    __name__, dict.fromkeys(("Log2Quantizer", "Log2Sqrt2Quantizer"), "vitquant.methods.repq.log2")
)

__all__ = [
    "QuantConfig",
    "PRESETS",
    "POINT_KINDS",
    "prepare",
    "calibrate",
    "compute_amax",
    "quant_summary",
    "format_summary",
    "enable_quantization",
    "quantization_disabled",
    "named_quantizers",
    "get_config",
    "batch_input",
    "save_calibrated",
    "load_calibrated",
    "QParams",
    "Quantizer",
    "QUANTIZERS",
    "UniformQuantizer",
    "QuantLinear",
    "QuantConv2d",
    "QuantMatMul",
    "QuantAdd",
    "QuantSoftmax",
    "QuantLayerNorm",
    "QuantAttention",
    "QuantBlock",
    "QuantMultiheadAttention",
    "QuantTransformerEncoderLayer",
]

"""Quantized modules: drop-in replacements that keep the float modules' parameter names.

* :mod:`.linear`: :class:`QuantLinear` (input / weight / after-GEMM output, SmoothQuant's
  ``smooth_scale``), :class:`QuantConv2d`;
* :mod:`.ops`: :class:`QuantMatMul` (q·kᵀ, attn·v), :class:`QuantAdd` (residual adds),
  :class:`QuantSoftmax` (softmax input), :class:`QuantLayerNorm` (LayerNorm input);
* :mod:`.attention`: equivalents of timm's ``Attention``/``Block``, ``nn.MultiheadAttention`` and
  ``nn.TransformerEncoderLayer`` that expose those ops;
* :mod:`.hf`: ``transformers`` ViT/DeiT layers turned, in place, into vitquant blocks.

The quantizer slots follow the FasterTransformer ViT example (see ``docs/ptq.md``).
"""

from __future__ import annotations

from vitquant.quant.modules.attention import (
    QuantAttention,
    QuantBlock,
    QuantMultiheadAttention,
    QuantTransformerEncoderLayer,
    additive_mask,
)
from vitquant.quant.modules.base import QuantModule, apply_q
from vitquant.quant.modules.hf import QuantHFLayer, swap_hf_layers
from vitquant.quant.modules.linear import QuantConv2d, QuantLinear, add_smooth_buffers
from vitquant.quant.modules.ops import QuantAdd, QuantLayerNorm, QuantMatMul, QuantSoftmax

__all__ = [
    "QuantModule",
    "apply_q",
    "QuantLinear",
    "QuantConv2d",
    "add_smooth_buffers",
    "QuantMatMul",
    "QuantAdd",
    "QuantSoftmax",
    "QuantLayerNorm",
    "QuantAttention",
    "QuantBlock",
    "QuantMultiheadAttention",
    "QuantTransformerEncoderLayer",
    "additive_mask",
    "QuantHFLayer",
    "swap_hf_layers",
]

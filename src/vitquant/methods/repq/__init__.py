"""RepQ-ViT (Li et al., 2023, arXiv 2212.08254) and FQ-ViT's log2 quantizers: the ``log2`` and
``log2_sqrt2`` softmax-output quantizers (:mod:`.log2`) of the ``repq`` preset. Its LayerNorm
reparameterisation is shared PTQ machinery in :mod:`vitquant.quant.reparam`, which
:func:`vitquant.quant.calibrate` applies when the preset asks for it.
"""

from __future__ import annotations

from vitquant.methods.repq.log2 import Log2Quantizer, Log2Sqrt2Quantizer

__all__ = ["Log2Quantizer", "Log2Sqrt2Quantizer"]

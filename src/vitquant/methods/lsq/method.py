"""The ``lsq`` method: quantization-aware training with learned step sizes.

Esser et al., "Learned Step Size Quantization" (ICLR 2020, arXiv 1902.08153), with LSQ+'s
learnable offset on the GELU output (Bhalgat et al., 2020). Weights per channel, activations
(Linear inputs, q, k, v, attention probabilities) per tensor; patch embedding and head at 8 bits;
step sizes initialised by an MSE fit on a few training batches. Distillation from ``--teacher``
(DeiT soft/hard) is the engine's.
"""

from __future__ import annotations

from vitquant.methods.base import METHODS
from vitquant.methods.qat.method import QATMethod, QATMethodConfig

__all__ = ["LSQMethod"]


@METHODS.register("lsq")
class LSQMethod(QATMethod):
    """LSQ quantization-aware training (``--wbits``, ``--abits``)."""

    name = "lsq"
    Config = QATMethodConfig
    summary = "quantization-aware training with learned step sizes (LSQ / LSQ+)"

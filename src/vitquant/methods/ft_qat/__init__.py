"""FasterTransformer's QAT (``--method ft-qat``): the calibrated model with fixed ranges trained
with ``CE + 10000·KL(T=3)`` to the float model (:mod:`.method`, :mod:`.losses`).
"""

from __future__ import annotations

from vitquant.methods.ft_qat.losses import kl_distillation
from vitquant.methods.ft_qat.method import FTQATConfig, FTQATMethod

__all__ = ["kl_distillation", "FTQATConfig", "FTQATMethod"]

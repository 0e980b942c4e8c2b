"""LSQ / LSQ+ (Esser et al., 2020, arXiv 1902.08153; Bhalgat et al., 2020): the learned-step
quantizers (:mod:`.quantizer`, registered as ``lsq`` and ``lsq+``; Q-ViT's and VVTQ's quantizers
build on them) and the ``--method lsq`` training hooks (:mod:`.method`).
"""

from __future__ import annotations

from vitquant.methods.lsq.method import LSQMethod
from vitquant.methods.lsq.quantizer import LSQPlusQuantizer, LSQQuantizer

__all__ = ["LSQQuantizer", "LSQPlusQuantizer", "LSQMethod"]

"""Q-ViT (Li et al., NeurIPS 2022, arXiv 2210.06707): the activation quantizer with a learnable
zero point (:mod:`.quantizer`), the information rectification module on q/k (:mod:`.irm`), the q/k
capture (:mod:`.capture`) and distribution-guided distillation (:mod:`.losses`) of DGD, the
``--method qvit`` hooks (:mod:`.method`) and the Q-ViT model names (:mod:`.models`).
"""

from __future__ import annotations

from vitquant.methods.qvit import models as _models  # noqa: F401  (registers names)
from vitquant.methods.qvit.capture import QKCapture
from vitquant.methods.qvit.irm import IRM_STATS, InformationRectification, fold_irm
from vitquant.methods.qvit.losses import dgd_loss, similarity_matrix
from vitquant.methods.qvit.method import QViTConfig, QViTMethod
from vitquant.methods.qvit.quantizer import QViTQuantizer

__all__ = [
    "QViTQuantizer",
    "InformationRectification",
    "fold_irm",
    "IRM_STATS",
    "QKCapture",
    "dgd_loss",
    "similarity_matrix",
    "QViTConfig",
    "QViTMethod",
]

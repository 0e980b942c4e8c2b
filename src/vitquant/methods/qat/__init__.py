"""Shared QAT machinery of LSQ, Q-ViT and VVTQ (not a method itself).

* :mod:`.quantize`: :class:`QATScheme` (where each method puts which quantizer),
  :func:`build_qat_model`, :func:`init_qat`, :class:`QATModule` (modules a scheme adds besides
  quantizers) and the registries through which the method packages plug in their parts (Q-ViT's
  IRM, VVTQ's split q/k/v);
* :mod:`.method`: :class:`QATMethod`, base of the ``lsq``, ``qvit`` and ``vvtq`` training methods;
* :mod:`.models`: the registry of QAT model names (:func:`base_architecture`).
"""

from __future__ import annotations

from vitquant.methods.qat.method import QATMethod, QATMethodConfig
from vitquant.methods.qat.models import base_architecture, register_qat_model
from vitquant.methods.qat.quantize import QATModule, QATScheme, build_qat_model, init_qat

__all__ = [
    "QATMethod",
    "QATMethodConfig",
    "QATModule",
    "QATScheme",
    "base_architecture",
    "build_qat_model",
    "init_qat",
    "register_qat_model",
]

"""Quantization-aware training: LSQ, Q-ViT and VVTQ model building and helpers.

* :mod:`.quantize`: :class:`QATScheme`, :func:`build_qat_model`, :func:`init_qat`;
* :mod:`.irm`: Q-ViT's information rectification module; :mod:`.capture`: q/k capture for DGD;
* :mod:`.split_attention`: VVTQ's separate q/k/v projections; :mod:`.oscillation`: oscillation
  tracking and freezing;
* :mod:`.models`: the Q-ViT / VVTQ model names; :mod:`.run`: :func:`run_qat`,
  :func:`make_softlabels`; :mod:`.ablation`: the ablation of ``docs/qat.md``.

The training methods themselves are ``vitquant/train/methods/{lsq,qvit,vvtq,ft_qat}.py``.
"""

from __future__ import annotations

from vitquant.qat import models as _models  # noqa: F401  (registers the Q-ViT / VVTQ names)
from vitquant.qat.capture import QKCapture
from vitquant.qat.irm import InformationRectification
from vitquant.qat.oscillation import OscillationTracker
from vitquant.qat.quantize import QATScheme, build_qat_model, init_qat
from vitquant.qat.run import make_softlabels, run_qat
from vitquant.qat.split_attention import SplitAttention, split_qkv

__all__ = [
    "OscillationTracker",
    "InformationRectification",
    "QKCapture",
    "SplitAttention",
    "split_qkv",
    "QATScheme",
    "build_qat_model",
    "init_qat",
    "run_qat",
    "make_softlabels",
]

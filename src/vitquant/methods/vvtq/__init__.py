"""VVTQ (Huang et al., TMLR 2024, arXiv 2307.00331): LSQ weights with oscillation tracking and
freezing (:mod:`.quantizer`, :mod:`.oscillation`), separate q/k/v projections
(:mod:`.split_attention`), multi-crop soft labels (:mod:`.softlabels`), the bin regulariser and
soft-label loss (:mod:`.losses`), the ``--method vvtq`` hooks (:mod:`.method`) and the VVTQ model
names (:mod:`.models`).
"""

from __future__ import annotations

from vitquant.methods.vvtq.losses import bin_regularizer, soft_cross_entropy
from vitquant.methods.vvtq.method import VVTQConfig, VVTQMethod
from vitquant.methods.vvtq.models import has_split_attention, load_fused_checkpoint
from vitquant.methods.vvtq.oscillation import OscillationTracker
from vitquant.methods.vvtq.quantizer import VVTQQuantizer
from vitquant.methods.vvtq.softlabels import MultiCropSoftLabelDataset, generate_softlabels
from vitquant.methods.vvtq.split_attention import SplitAttention, split_qkv

__all__ = [
    "VVTQQuantizer",
    "OscillationTracker",
    "SplitAttention",
    "split_qkv",
    "bin_regularizer",
    "soft_cross_entropy",
    "MultiCropSoftLabelDataset",
    "generate_softlabels",
    "has_split_attention",
    "load_fused_checkpoint",
    "VVTQConfig",
    "VVTQMethod",
]

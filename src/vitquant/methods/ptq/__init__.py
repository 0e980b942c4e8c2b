"""Post-training quantization grids over the presets of :mod:`vitquant.quant.presets`
(FasterTransformer's ft1/ft2/ft3/trt and RepQ-ViT's repq): :func:`run_ptq`, :func:`ptq_sweep`,
:func:`ptq_grid`; SmoothQuant's outlier migration (:mod:`.smoothquant`, pass ``smooth``):
:func:`smooth`, :func:`smooth_and_calibrate`; loss-aware ranges (:mod:`.loss_aware`, pass
``output_mse``); bias correction (:mod:`.bias_correction`, pass ``bias_correct``:
:func:`correct_bias`); block reconstruction (:mod:`.reconstruct`, pass ``reconstruct``,
:func:`reconstruct`; Fisher weights of its loss, :mod:`.fisher`: :func:`block_fisher_weights`);
accuracy-driven fallback (:mod:`.fallback`): :func:`fallback`, and with reconstruction
(:mod:`.fallback_reconstructed`): :func:`fallback_with_reconstruction`. The PTQ core (points,
calibrators, :func:`vitquant.quant.calibrate`) lives in :mod:`vitquant.quant`.
"""

from __future__ import annotations

from vitquant.methods.ptq.bias_correction import BiasCorrection, BiasShift, correct_bias
from vitquant.methods.ptq.fallback import FallbackConfig, FallbackReport, fallback
from vitquant.methods.ptq.fallback_reconstructed import (
    ReconstructedFallback,
    fallback_with_reconstruction,
    meets_budget,
)
from vitquant.methods.ptq.fisher import block_fisher_weights
from vitquant.methods.ptq.loss_aware import OutputMSE, refine_ranges
from vitquant.methods.ptq.reconstruct import (
    BlockReport,
    ReconstructConfig,
    ReconstructReport,
    reconstruct,
)
from vitquant.methods.ptq.reconstruct_pass import (
    ReconstructPass,
    reconstruct_report,
    reconstruct_with,
    without_reconstruction,
)
from vitquant.methods.ptq.smoothquant import (
    SmoothLayer,
    SmoothPass,
    smooth,
    smooth_and_calibrate,
    smoothing_report,
)
from vitquant.methods.ptq.sweep import config_label, ptq_grid, ptq_sweep, run_ptq

__all__ = [
    "run_ptq",
    "ptq_sweep",
    "ptq_grid",
    "config_label",
    "SmoothLayer",
    "SmoothPass",
    "smooth",
    "smooth_and_calibrate",
    "smoothing_report",
    "refine_ranges",
    "OutputMSE",
    "correct_bias",
    "BiasCorrection",
    "BiasShift",
    "block_fisher_weights",
    "fallback",
    "FallbackConfig",
    "FallbackReport",
    "fallback_with_reconstruction",
    "ReconstructedFallback",
    "meets_budget",
    "reconstruct",
    "ReconstructConfig",
    "ReconstructReport",
    "BlockReport",
    "ReconstructPass",
    "reconstruct_report",
    "reconstruct_with",
    "without_reconstruction",
]

"""Post-training quantization grids over the presets of :mod:`vitquant.quant.presets`
(FasterTransformer's ft1/ft2/ft3/trt and RepQ-ViT's repq): :func:`run_ptq`, :func:`ptq_sweep`,
:func:`ptq_grid`; SmoothQuant's outlier migration (:mod:`.smoothquant`): :func:`smooth`,
:func:`smooth_and_calibrate`. The PTQ core (points, calibrators, :func:`vitquant.quant.calibrate`)
lives in :mod:`vitquant.quant`.
"""

from __future__ import annotations

from vitquant.methods.ptq.smoothquant import (
    SmoothLayer,
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
    "smooth",
    "smooth_and_calibrate",
    "smoothing_report",
]

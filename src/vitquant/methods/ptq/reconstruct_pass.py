"""Block reconstruction as a calibration pass (``"reconstruct"``) and the report it leaves.

:func:`~vitquant.methods.ptq.reconstruct.reconstruct` takes a float model and a calibrated copy.
Inside :func:`vitquant.quant.calibrate` there is only the prepared model, so the pass makes the
float reference itself: a deep copy of the calibrated model with every quantizer off. That copy
computes the original float function, because every transform that ran before it (SmoothQuant
migration, RepQ-ViT's LayerNorm reparameterisation) preserves the float outputs. The pass runs
after the other passes, whatever order the config names them in: reconstruction refines a
finished calibration, and ranges chosen after it would undo the learned activation scales.

Use it by name, ``QuantConfig(..., passes=["smooth", "output_mse", "reconstruct"],
pass_options={"reconstruct": {"iterations": 200}})``, through the ``lowbit`` preset, or from the
command line (``vitquant calibrate --preset lowbit`` / ``--reconstruct``). The options are the
fields of :class:`~vitquant.methods.ptq.reconstruct.ReconstructConfig`; what the pass did is kept
on the model (:func:`reconstruct_report`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from vitquant.errors import ConfigError
from vitquant.methods.ptq.reconstruct import ReconstructConfig, ReconstructReport, reconstruct
from vitquant.quant.api import enable_quantization
from vitquant.quant.config import QuantConfig
from vitquant.quant.passes import CALIBRATION_PASSES, CalibrationPass

__all__ = ["ReconstructPass", "reconstruct_report", "without_reconstruction", "reconstruct_with"]

_REPORT_ATTR = "_vitquant_reconstruct_report"


def reconstruct_report(model: nn.Module) -> ReconstructReport | None:
    """The report of the ``reconstruct`` pass that last ran on ``model`` (None if none ran)."""
    return getattr(model, _REPORT_ATTR, None)


@CALIBRATION_PASSES.register("reconstruct")
class ReconstructPass(CalibrationPass):
    """BRECQ/AdaRound block reconstruction after the ranges are set (see the module docstring).

    Args:
        **options: fields of :class:`ReconstructConfig` (``iterations``, ``batch_size``, ...).

    Raises:
        ConfigError: an option that :class:`ReconstructConfig` does not have, or a bad value.
    """

    name = "reconstruct"
    runs_last = True
    shows_progress = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        try:
            self.config = ReconstructConfig(**options)
        except TypeError as e:
            raise ConfigError(f"reconstruct pass: {e}") from None

    def after_ranges(self, model: nn.Module, batches: Sequence[Any], config: QuantConfig) -> None:
        reference = copy.deepcopy(model)
        enable_quantization(reference, False)
        report = reconstruct(reference, model, batches, self.config)
        setattr(model, _REPORT_ATTR, report)


def without_reconstruction(config: QuantConfig) -> QuantConfig:
    """``config`` with the ``reconstruct`` pass taken out (its other passes kept), for work that
    must see the float weights before reconstruction moves them onto their low-bit grid."""
    passes = [p for p in config.effective_passes if p != ReconstructPass.name]
    return dataclasses.replace(config, passes=passes)


def reconstruct_with(
    model: nn.Module, batches: Sequence[Any], config: QuantConfig, **options: Any
) -> ReconstructReport | None:
    """Runs ``config``'s ``reconstruct`` pass (its options, updated by ``options``) on a model
    calibrated with :func:`without_reconstruction` of it; returns the pass's report."""
    merged = {**config.effective_pass_options.get(ReconstructPass.name, {}), **options}
    ReconstructPass(**merged).after_ranges(model, batches, config)
    return reconstruct_report(model)

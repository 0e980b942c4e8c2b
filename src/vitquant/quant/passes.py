"""Calibration passes: model transforms that :func:`~vitquant.quant.calibrate` runs around its
statistics, named in a :class:`~vitquant.quant.QuantConfig` (``passes``) or its preset.

A pass is a method's contribution to PTQ that is not a quantizer: SmoothQuant-style migration of
activation outliers into the weights runs *before* the statistics (on the float function, with
quantization off), loss-aware range selection *after* the ranges (with quantization on). Passes
live in their method's package (``vitquant/methods/ptq/``) and register themselves here, so the
PTQ core imports none of them::

    @CALIBRATION_PASSES.register("output_mse")
    class OutputMSE(CalibrationPass):
        def after_ranges(self, model, batches, config): ...

``calibrate`` hands every pass the same calibration batches (a list, so that a pass may read them
several times) and runs them in the order the config names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from vitquant.errors import ConfigError
from vitquant.registry import Registry

if TYPE_CHECKING:
    from vitquant.quant.config import QuantConfig

__all__ = ["CALIBRATION_PASSES", "CalibrationPass", "build_passes"]


class CalibrationPass:
    """Base of the calibration passes; both hooks default to doing nothing.

    Args:
        **options: the pass's options (``QuantConfig.pass_options[name]``).
    """

    name = ""
    #: run after every pass without this flag, whatever order the config names them in
    runs_last = False
    #: the option names the pass takes (None: any; the pass checks them itself)
    option_names: frozenset[str] | None = None
    #: the pass takes a ``progress`` option (a tqdm bar), which ``calibrate(progress=False)``
    #: turns off
    shows_progress = False

    def __init__(self, **options: Any) -> None:
        if self.option_names is not None:
            bad = set(options) - self.option_names
            if bad:
                raise ConfigError(
                    f"{self.name}: unknown option(s) {', '.join(sorted(bad))}; use "
                    f"{', '.join(sorted(self.option_names))}"
                )
        self.options = dict(options)

    def before_statistics(
        self, model: nn.Module, batches: Sequence[Any], config: QuantConfig
    ) -> None:
        """Runs on the prepared model with quantization off, before any statistics: a change of
        the float function's parametrisation (it must keep the float outputs)."""

    def after_ranges(self, model: nn.Module, batches: Sequence[Any], config: QuantConfig) -> None:
        """Runs once every activation and weight range is set: a refinement of the ranges."""


#: every registered calibration pass, by name
CALIBRATION_PASSES: Registry[type[CalibrationPass]] = Registry("calibration pass")


def build_passes(config: QuantConfig, progress: bool = True) -> list[CalibrationPass]:
    """The config's passes (``config.effective_passes``), built with their options; without
    ``progress`` none shows a progress bar, whatever its options say.

    Raises:
        ConfigError: an unknown pass name (the closest names are listed).
    """
    options = config.effective_pass_options
    built = []
    for name in config.effective_passes:
        cls = CALIBRATION_PASSES.get(name)
        opts = dict(options.get(name, {}))
        if not progress and cls.shows_progress:
            opts["progress"] = False
        built.append(cls(**opts))
    return sorted(built, key=lambda p: bool(p.runs_last))  # stable: config order otherwise

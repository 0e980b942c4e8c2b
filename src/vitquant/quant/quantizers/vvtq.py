"""VVTQ's weight quantizer: LSQ with oscillation tracking and freezing, and the bin regulariser.

Huang et al., "Quantization Variation: A New Perspective on Training Transformers with Low-Bit
Precision" (VVTQ, TMLR 2024, arXiv 2307.00331). Weights are LSQ-quantized; during training each
weight's integer value is tracked and weights that oscillate between two levels are frozen
(Nagel et al., ICML 2022, arXiv 2203.11086; VVTQ's code only tracked them, here they really
freeze, see :class:`~vitquant.qat.oscillation.OscillationTracker`). :meth:`penalty` returns the
bin regulariser of :func:`~vitquant.train.losses_qat.bin_regularizer` times
:attr:`VVTQQuantizer.reg_weight`, which the training method sets from its cosine schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import primitives as P
from .base import QUANTIZERS
from .lsq import LSQQuantizer

__all__ = ["VVTQQuantizer"]


@QUANTIZERS.register("vvtq")
class VVTQQuantizer(LSQQuantizer):
    """LSQ weight quantizer that tracks (and optionally freezes) oscillating weights.

    Args:
        bits: bit width.
        track: track oscillations in training mode.
        freeze: freeze weights whose oscillation frequency exceeds ``osc_threshold``.
        osc_momentum: EMA momentum of the oscillation frequency.
        osc_threshold: frequency above which a weight is oscillating.
        **kw: as :class:`LSQQuantizer`.

    Attributes:
        reg_weight: weight ``λ`` of the bin regulariser returned by :meth:`penalty` (0: off).
    """

    method = "vvtq"

    def __init__(
        self,
        bits: int = 4,
        *,
        track: bool = True,
        freeze: bool = True,
        osc_momentum: float = 0.01,
        osc_threshold: float = 0.1,
        **kw: Any,
    ) -> None:
        super().__init__(bits, **kw)
        from ...qat.oscillation import OscillationTracker

        self.track = bool(track)
        self.oscillation = OscillationTracker(osc_momentum, osc_threshold, freeze)
        self.reg_weight = 0.0
        self._last_input: Tensor | None = None

    def fake_quant(self, x: Tensor) -> Tensor:
        if not (self.track and self.training) and not self.oscillation.freeze:
            self._remember(x)
            return super().fake_quant(x)
        g = self.grad_factor(x)
        s = self.expanded(P.grad_scale(self.scale, g), x)
        z = self._zero_point(g)
        z = self.expanded(z, x) if isinstance(z, Tensor) else z
        x_int = torch.clamp(P.round_ste(x / s + z), self.qmin, self.qmax)
        if self.track and self.training and torch.is_grad_enabled():
            self.oscillation.update(x_int.detach())
        x_int = self.oscillation.apply(x_int)
        self._remember(x)
        return ((x_int - z) * s).to(x.dtype)

    def _remember(self, w: Tensor) -> None:
        # a plain attribute: assigning a Parameter through nn.Module would register it
        object.__setattr__(self, "_last_input", w)

    def penalty(self) -> Tensor | None:
        """``reg_weight ·`` bin regulariser of the last quantized weight (None when off)."""
        if self.reg_weight <= 0 or self._last_input is None or not self.is_calibrated:
            return None
        from ...train.losses_qat import bin_regularizer

        w = self._last_input
        s = self.expanded(self.scale, w)
        return self.reg_weight * bin_regularizer(w, s, self.qmin, self.qmax)

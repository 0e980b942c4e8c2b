"""VVTQ's weight quantizer: LSQ with oscillation tracking and freezing, and the bin regulariser.

Huang et al., "Quantization Variation: A New Perspective on Training Transformers with Low-Bit
Precision" (VVTQ, TMLR 2024, arXiv 2307.00331). Weights are LSQ-quantized; during training each
weight's integer value is tracked and weights that oscillate between two levels are frozen
(Nagel et al., ICML 2022, arXiv 2203.11086; VVTQ's code only tracked them, here they really
freeze, see :class:`~vitquant.methods.vvtq.oscillation.OscillationTracker`). :meth:`penalty`
returns the
bin regulariser of :func:`~vitquant.methods.vvtq.losses.bin_regularizer` times
:attr:`VVTQQuantizer.reg_weight`, which the training method sets from its cosine schedule.

The frozen codes are part of :meth:`~vitquant.quant.quantizers.base.Quantizer.int_codes`, the one
definition of the codes that the fake-quant forward, the packed export and the int8 runtime share,
so a frozen weight keeps its frozen code in all three.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vitquant.methods.lsq.quantizer import LSQQuantizer
from vitquant.quant.quantizers.base import QUANTIZERS

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
        from vitquant.methods.vvtq.oscillation import OscillationTracker

        self.track = bool(track)
        self.oscillation = OscillationTracker(osc_momentum, osc_threshold, freeze)
        self.reg_weight = 0.0
        self._last_input: Tensor | None = None

    def fake_quant(self, x: Tensor) -> Tensor:
        """LSQ's fake quantization of the codes of :meth:`int_codes` (frozen weights at their
        frozen codes); in training mode with gradients it first records the latent codes in the
        oscillation tracker (which may freeze new weights)."""
        self._remember(x)
        return super().fake_quant(x)

    def _codes(self, x: Tensor, s: Tensor, z: Tensor, training_step: bool = False) -> Tensor:
        """LSQ's codes with the frozen weights' codes substituted (no gradient there)."""
        latent = super()._codes(x, s, z)
        if training_step and self.track and self.training and torch.is_grad_enabled():
            self.oscillation.update(latent.detach())
        return self.oscillation.apply(latent)

    def _remember(self, w: Tensor) -> None:
        # a plain attribute: assigning a Parameter through nn.Module would register it
        object.__setattr__(self, "_last_input", w)

    def penalty(self) -> Tensor | None:
        """``reg_weight ·`` bin regulariser of the last quantized weight (None when off)."""
        if self.reg_weight <= 0 or self._last_input is None or not self.is_calibrated:
            return None
        from vitquant.methods.vvtq.losses import bin_regularizer

        w = self._last_input
        s = self.expanded(self.scale, w)
        return self.reg_weight * bin_regularizer(w, s, self.qmin, self.qmax)

"""Logarithmic quantizers for attention probabilities (softmax outputs).

``log2`` follows FQ-ViT's Log-Int-Softmax quantizer (Lin et al., 2022, arXiv 2111.13824):
``x_hat = scale * 2^(-q)`` with integer ``q`` in ``0..2^b - 1``, so that ``attn @ v`` becomes
shifts. ``log2_sqrt2`` follows RepQ-ViT's log-sqrt2 quantizer (Li et al., 2023, arXiv
2212.08254): base ``sqrt(2)``, ``x_hat = scale * 2^(-q/2)``, finer near the large probabilities
that matter. Both are unsigned; the top code stands for zero (see
:func:`vitquant.quant.primitives.log2_quantize`). The scale is the observed maximum: clipping the
largest attention probabilities costs more than coarse small ones, so the range always uses the
``max`` statistic whatever calibration method the rest of the model uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vitquant.quant import primitives as P
from vitquant.quant.quantizers.base import QUANTIZERS, Quantizer

__all__ = ["Log2Quantizer", "Log2Sqrt2Quantizer"]


@QUANTIZERS.register("log2")
class Log2Quantizer(Quantizer):
    """Power-of-two quantizer for non-negative inputs (``signed`` and ``symmetric`` are fixed)."""

    kind = "log2"
    sqrt2 = False

    def __init__(self, bits: int = 4, **kw: Any) -> None:
        kw.update(signed=False, symmetric=True, narrow=False)
        super().__init__(bits, **kw)

    def _collect_method(self, method: str) -> str:
        return "max"

    def set_range(self, amax: Tensor, amin: Tensor | None = None) -> None:
        """The scale is ``amax`` itself (code 0 is ``amax``)."""
        amax = amax.detach().float().clamp(min=1e-12).to(self.scale.device)
        self.amax = amax
        self.scale = amax.clone()
        self.zero_point = amax.new_zeros(amax.shape)

    def set_qparams(self, scale: Tensor, zero_point: Tensor, granularity: Any = None) -> None:
        if granularity is not None:
            self.granularity = granularity
        self.set_range(scale)

    def _codes(self, x: Tensor, s: Tensor, z: Tensor, training_step: bool = False) -> Tensor:
        return P.log2_quantize(x, s, self.bits, self.sqrt2)

    def _dequant(self, codes: Tensor, s: Tensor, z: Tensor, x: Tensor) -> Tensor:
        return P.log2_dequantize(codes, s, self.bits, self.sqrt2).to(x.dtype)

    def fake_quant(self, x: Tensor) -> Tensor:
        """The dequantized :meth:`int_codes` (as
        :func:`~vitquant.quant.primitives.fake_quant_log2`): straight-through gradient on
        ``[0, scale]``, zero outside."""
        s, z = self._grid(x)
        with torch.no_grad():
            x_hat = self._dequant(self._codes(x, s, z, training_step=True), s, z, x)
        inside = (x >= 0) & (x <= s)
        return torch.where(inside, x + (x_hat - x).detach(), x_hat)


@QUANTIZERS.register("log2_sqrt2")
class Log2Sqrt2Quantizer(Log2Quantizer):
    """Base-``sqrt(2)`` logarithmic quantizer (RepQ-ViT's log-sqrt2)."""

    kind = "log2_sqrt2"
    sqrt2 = True

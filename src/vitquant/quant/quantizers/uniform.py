"""Uniform (affine) quantizer with fixed, calibrated ranges.

The quantizer of NVIDIA's pytorch-quantization ``TensorQuantizer`` as the FasterTransformer ViT
example uses it (symmetric, ``scale = amax / qmax``, straight-through gradient inside the range),
extended to unsigned and asymmetric grids, narrow range, and per channel / head / group scales.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitquant.quant.quantizers.base import QUANTIZERS, Quantizer

__all__ = ["UniformQuantizer"]


@QUANTIZERS.register("uniform")
class UniformQuantizer(Quantizer):
    """``x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s`` with calibrated ``s``, ``z``.

    Example:
        >>> q = UniformQuantizer(8, granularity=PerChannel(0), role="weight")
        >>> q.calibrate_tensor(linear.weight)          # max calibration
        >>> w_hat = q(linear.weight)
    """

    kind = "uniform"

    def _codes(self, x: Tensor, s: Tensor, z: Tensor, training_step: bool = False) -> Tensor:
        return torch.clamp(self._unclamped(x, s, z), self.qmin, self.qmax)

    @staticmethod
    def _unclamped(x: Tensor, s: Tensor, z: Tensor) -> Tensor:
        return torch.round(x / s) + z

    def fake_quant(self, x: Tensor) -> Tensor:
        """:func:`~vitquant.quant.primitives.fake_quant`: the dequantized :meth:`int_codes`, with a
        straight-through gradient where ``x`` lies inside the grid's range and none outside."""
        s, z = self._grid(x)
        q = self._unclamped(x, s, z)
        inside = (q >= self.qmin) & (q <= self.qmax)
        # the codes of int_codes (clamped q), computed once with the range mask
        x_hat = (torch.clamp(q, self.qmin, self.qmax) - z) * s
        return torch.where(inside, x + (x_hat - x).detach(), x_hat.detach()).to(x.dtype)

"""Uniform (affine) quantizer with fixed, calibrated ranges.

The quantizer of NVIDIA's pytorch-quantization ``TensorQuantizer`` as the FasterTransformer ViT
example uses it (symmetric, ``scale = amax / qmax``, straight-through gradient inside the range),
extended to unsigned and asymmetric grids, narrow range, and per channel / head / group scales.
"""

from __future__ import annotations

from torch import Tensor

from .. import primitives as P
from .base import QUANTIZERS, Quantizer

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

    def fake_quant(self, x: Tensor) -> Tensor:
        s = self.expanded(self.scale, x)
        z = self.expanded(self.zero_point, x)
        return P.fake_quant(x, s, z, self.qmin, self.qmax).to(x.dtype)

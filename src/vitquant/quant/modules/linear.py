"""Quantized ``nn.Linear`` and ``nn.Conv2d`` with the FasterTransformer ViT example's points.

A FasterTransformer ``LinearActivation`` quantizes its input, its weight and its GEMM output
before the bias ("after GEMM"); :class:`QuantLinear` has the same three slots. Both classes keep
the float module's ``weight``/``bias`` and are made from a float module in place by
``from_float`` (the instance's class changes; its parameters and hooks stay).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import QuantModule, apply_q

__all__ = ["QuantLinear", "QuantConv2d"]


class QuantLinear(nn.Linear, QuantModule):
    """``nn.Linear`` with ``input_quantizer``, ``weight_quantizer`` and ``output_quantizer``.

    ``output_quantizer`` acts on ``x @ wᵀ`` before the bias is added (FT's ``_aftergemm``).
    With every slot empty or inactive the forward is exactly ``F.linear(x, weight, bias)``.
    """

    quant_points = {
        "input_quantizer": "linear_input",
        "weight_quantizer": "weight",
        "output_quantizer": "aftergemm",
    }
    quant_weights = {"weight_quantizer": "weight"}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.init_slots()

    @classmethod
    def from_float(cls, m: nn.Linear) -> QuantLinear:
        """Turns ``m`` into a :class:`QuantLinear` in place (same parameters) and returns it."""
        m.__class__ = cls
        assert isinstance(m, QuantLinear)
        m.init_slots()
        return m

    def forward(self, x: Tensor) -> Tensor:
        x = apply_q(self.input_quantizer, x)
        w = apply_q(self.weight_quantizer, self.weight)
        oq = self.output_quantizer
        if oq is None or not (oq.active or oq.calibrating):
            return F.linear(x, w, self.bias)
        y = oq(F.linear(x, w))
        return y if self.bias is None else y + self.bias


class QuantConv2d(nn.Conv2d, QuantModule):
    """``nn.Conv2d`` (the patch embedding) with ``input_quantizer`` and ``weight_quantizer``."""

    quant_points = {"input_quantizer": "linear_input", "weight_quantizer": "weight"}
    quant_weights = {"weight_quantizer": "weight"}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.init_slots()

    @classmethod
    def from_float(cls, m: nn.Conv2d) -> QuantConv2d:
        """Turns ``m`` into a :class:`QuantConv2d` in place and returns it."""
        m.__class__ = cls
        assert isinstance(m, QuantConv2d)
        m.init_slots()
        return m

    def forward(self, x: Tensor) -> Tensor:
        x = apply_q(self.input_quantizer, x)
        w = apply_q(self.weight_quantizer, self.weight)
        return self._conv_forward(x, w, self.bias)

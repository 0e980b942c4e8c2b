"""Quantized ``nn.Linear`` and ``nn.Conv2d`` with the FasterTransformer ViT example's points.

A FasterTransformer ``LinearActivation`` quantizes its input, its weight and its GEMM output
before the bias ("after GEMM"); :class:`QuantLinear` has the same three slots. Both classes keep
the float module's ``weight``/``bias`` and are made from a float module in place by
``from_float`` (:meth:`QuantModule.from_float`: the instance's class changes; its parameters and
hooks stay). :func:`linear_aftergemm` is the after-GEMM linear shared with
``QuantMultiheadAttention``'s input projection.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.quant.modules.base import QuantModule, apply_q
from vitquant.quant.quantizers import Quantizer

__all__ = ["QuantLinear", "QuantConv2d", "linear_aftergemm"]


def linear_aftergemm(x: Tensor, w: Tensor, b: Tensor | None, oq: Quantizer | None) -> Tensor:
    """``F.linear(x, w, b)`` with ``oq`` (if any) on the GEMM output ``x @ wᵀ``, before the bias.

    Exactly ``F.linear(x, w, b)`` when ``oq`` is empty or would not change its input (neither
    active nor calibrating), so an unquantized layer keeps the fused bias add.
    """
    if oq is None or not (oq.active or oq.calibrating):
        return F.linear(x, w, b)
    y = oq(F.linear(x, w))
    return y if b is None else y + b


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

    def forward(self, x: Tensor) -> Tensor:
        x = apply_q(self.input_quantizer, x)
        w = apply_q(self.weight_quantizer, self.weight)
        return linear_aftergemm(x, w, self.bias, self.output_quantizer)


class QuantConv2d(nn.Conv2d, QuantModule):
    """``nn.Conv2d`` (the patch embedding) with ``input_quantizer`` and ``weight_quantizer``."""

    quant_points = {"input_quantizer": "linear_input", "weight_quantizer": "weight"}
    quant_weights = {"weight_quantizer": "weight"}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.init_slots()

    def forward(self, x: Tensor) -> Tensor:
        x = apply_q(self.input_quantizer, x)
        w = apply_q(self.weight_quantizer, self.weight)
        return self._conv_forward(x, w, self.bias)

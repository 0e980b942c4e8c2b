"""Quantized ``nn.Linear`` and ``nn.Conv2d`` with the FasterTransformer ViT example's points.

A FasterTransformer ``LinearActivation`` quantizes its input, its weight and its GEMM output
before the bias ("after GEMM"); :class:`QuantLinear` has the same three slots. Both classes keep
the float module's ``weight``/``bias`` and are made from a float module in place by
``from_float`` (:meth:`QuantModule.from_float`: the instance's class changes; its parameters and
hooks stay). :func:`linear_aftergemm` is the after-GEMM linear shared with
``QuantMultiheadAttention``'s input projection.

A :class:`QuantLinear` may carry a per-input-channel smoothing factor ``smooth_scale`` (``s``,
SmoothQuant, Xiao et al., 2023, arXiv 2211.10438): its input is divided by ``s`` before the input
quantizer, and its weight columns hold ``W diag(s)``, so the float function is unchanged while
the quantizer sees a flatter tensor. The int8 runtime folds ``s`` into the quantization of the
input (``round(x / (s * scale))``), so the GEMM stays per-tensor int8. The buffer is ``None``
(absent from the state dict) unless set; :func:`add_smooth_buffers` makes room for the factors a
state dict holds before a checked load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.quant.modules.base import QuantModule, apply_q
from vitquant.quant.quantizers import Quantizer

__all__ = ["QuantLinear", "QuantConv2d", "linear_aftergemm", "add_smooth_buffers", "SMOOTH_BUFFER"]

#: Name of the per-input-channel smoothing buffer of a :class:`QuantLinear`.
SMOOTH_BUFFER = "smooth_scale"


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
    With every slot empty or inactive and no ``smooth_scale`` the forward is exactly
    ``F.linear(x, weight, bias)``; with ``smooth_scale`` (float ``[in_features]``, None by
    default) the input is divided by it before ``input_quantizer``.
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

    def init_slots(self) -> None:
        """Creates the empty quantizer slots and the (None) ``smooth_scale`` buffer."""
        super().init_slots()
        if SMOOTH_BUFFER not in self._buffers:
            self.register_buffer(SMOOTH_BUFFER, None)

    def forward(self, x: Tensor) -> Tensor:
        s = self._buffers.get(SMOOTH_BUFFER)
        if s is not None:
            x = x / s
        x = apply_q(self.input_quantizer, x)
        w = apply_q(self.weight_quantizer, self.weight)
        return linear_aftergemm(x, w, self.bias, self.output_quantizer)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # a smoothed layer's state loads into a freshly prepared (unsmoothed) one
        value = state_dict.get(prefix + SMOOTH_BUFFER)
        if torch.is_tensor(value) and self._buffers.get(SMOOTH_BUFFER) is None:
            self._buffers[SMOOTH_BUFFER] = torch.ones_like(value, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]


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


def add_smooth_buffers(model: nn.Module, state: Mapping[str, Any]) -> int:
    """Gives every :class:`QuantLinear` of ``model`` whose ``smooth_scale`` ``state`` holds a
    placeholder buffer of that shape (ones), so that ``model.state_dict()`` has the same keys as
    ``state`` before a checked load. Returns the number of buffers added."""
    added = 0
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear) or m._buffers.get(SMOOTH_BUFFER) is not None:
            continue
        value = state.get(f"{name}.{SMOOTH_BUFFER}" if name else SMOOTH_BUFFER)
        if torch.is_tensor(value):
            m._buffers[SMOOTH_BUFFER] = torch.ones_like(value, device=m.weight.device)
            added += 1
    return added

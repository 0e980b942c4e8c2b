"""Quantized parameter-free ops: matmul, residual add, softmax, and LayerNorm with a quantized
input, matching the FasterTransformer ViT example's attention and block quantizers
(``matmul_{q,k,v,a}_input``, ``softmax_input``, ``add{1,2}_{residual,local}_input``,
``layernorm_input{1,2}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.quant.modules.base import QuantModule, apply_q

__all__ = ["QuantMatMul", "QuantAdd", "QuantSoftmax", "QuantLayerNorm"]

_MATMUL_POINTS = {
    "qk": {"a_quantizer": "matmul_input", "b_quantizer": "matmul_input"},
    "av": {"a_quantizer": "softmax_output", "b_quantizer": "matmul_input"},
    "matmul": {"a_quantizer": "matmul_input", "b_quantizer": "matmul_input"},
}


class QuantMatMul(nn.Module, QuantModule):
    """``a @ b`` with ``a_quantizer``, ``b_quantizer`` and ``output_quantizer``.

    Args:
        role: ``"qk"`` (q·kᵀ: a = q, b = kᵀ), ``"av"`` (attn·v: a = probabilities, b = v) or
            ``"matmul"``; it decides the point kinds of the operands.
    """

    role: str = "matmul"  # (the default also serves ``from_float(MatMul())``)

    def __init__(self, role: str = "matmul") -> None:
        super().__init__()
        if role not in _MATMUL_POINTS:
            raise ValueError(f"role must be one of {list(_MATMUL_POINTS)}, not {role!r}")
        self.role = role
        self.init_slots()

    def point_kinds(self) -> dict[str, str]:
        return {**_MATMUL_POINTS[self.role], "output_quantizer": "matmul_output"}

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        out = torch.matmul(apply_q(self.a_quantizer, a), apply_q(self.b_quantizer, b))
        return apply_q(self.output_quantizer, out)

    def extra_repr(self) -> str:
        return f"role={self.role}"


class QuantAdd(nn.Module, QuantModule):
    """``a + b`` with ``a_quantizer`` (residual/skip input) and ``b_quantizer`` (branch input)."""

    quant_points = {"a_quantizer": "residual_input", "b_quantizer": "local_input"}

    def __init__(self) -> None:
        super().__init__()
        self.init_slots()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return apply_q(self.a_quantizer, a) + apply_q(self.b_quantizer, b)


class QuantSoftmax(nn.Softmax, QuantModule):
    """``nn.Softmax`` with ``input_quantizer`` on the scores; an additive ``mask`` (attention
    masks, ``-inf`` allowed) is applied after the quantizer so masked entries stay masked."""

    quant_points = {"input_quantizer": "softmax_input"}

    def __init__(self, dim: int = -1) -> None:
        super().__init__(dim)
        self.init_slots()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        x = apply_q(self.input_quantizer, x)
        if mask is not None:
            x = x + mask
        return F.softmax(x, self.dim, _stacklevel=5)


class QuantLayerNorm(nn.LayerNorm, QuantModule):
    """``nn.LayerNorm`` with ``input_quantizer`` (same ``weight``/``bias``)."""

    quant_points = {"input_quantizer": "layernorm_input"}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.init_slots()

    def forward(self, x: Tensor) -> Tensor:
        x = apply_q(self.input_quantizer, x)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

"""Quantized parameter-free ops: matmul, residual add, softmax, and LayerNorm with a quantized
input, matching the FasterTransformer ViT example's attention and block quantizers
(``matmul_{q,k,v,a}_input``, ``softmax_input``, ``add{1,2}_{residual,local}_input``,
``layernorm_input{1,2}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.quant import primitives as P
from vitquant.quant.modules.base import QuantModule, apply_q
from vitquant.quant.quantizers import Quantizer

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
        a, b = apply_q(self.a_quantizer, a), apply_q(self.b_quantizer, b)
        out = self.integer_product(a, b)
        return apply_q(self.output_quantizer, torch.matmul(a, b) if out is None else out)

    def integer_product(self, a_hat: Tensor, b_hat: Tensor) -> Tensor | None:
        """The product of the fake-quantized operands as the int8 runtime computes it, when
        both have per-tensor uniform grids and no gradient is needed: the codes (recovered
        exactly from the dequantized values) multiplied and summed exactly, times ``s_a * s_b``
        (:func:`~vitquant.quant.primitives.integer_matmul`). It differs from ``a_hat @ b_hat``
        only by float rounding, but the rounding is the runtime's, so a per-token grid built
        from it downstream rounds its ties as the runtime does. ``None`` otherwise (training,
        other grids, compiling, a quantizer's forward stood in for), where the forward pass
        multiplies the fake-quantized operands."""
        qa, qb = self.a_quantizer, self.b_quantizer
        if not (_per_tensor_uniform(qa) and _per_tensor_uniform(qb)):
            return None
        assert qa is not None and qb is not None
        if a_hat.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling():
            return None
        if torch.is_grad_enabled() and (
            a_hat.requires_grad or b_hat.requires_grad or _trainable(qa) or _trainable(qb)
        ):
            return None
        sa, sb = qa.scale.detach().reshape(()), qb.scale.detach().reshape(())
        ca = torch.round(a_hat / sa.to(a_hat.dtype))  # codes minus zero point
        cb = torch.round(b_hat / sb.to(a_hat.dtype)).to(a_hat.dtype)
        bound = a_hat.shape[-1] * (qa.qmax - qa.qmin) * (qb.qmax - qb.qmin)
        return P.integer_matmul(ca, cb, sa.double() * sb.double(), bound)

    def extra_repr(self) -> str:
        return f"role={self.role}"


def _per_tensor_uniform(q: Quantizer | None) -> bool:
    return (
        isinstance(q, Quantizer)  # (not an export's stand-in module)
        and q.kind == "uniform"
        and q.active
        and q.scale.numel() == 1
        and "forward" not in q.__dict__  # (a stand-in with a scale of its own)
    )


def _trainable(q: Quantizer) -> bool:
    return any(p.requires_grad for p in q.parameters())


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

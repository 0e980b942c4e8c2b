"""Attention with separate q, k and v projections, for VVTQ's module-dependent quantization.

VVTQ (Huang et al., TMLR 2024, arXiv 2307.00331) quantizes the query, key and value projections
as three layers with their own step sizes, because their weights and outputs vary very
differently. :class:`SplitAttention` computes exactly what the fused-``qkv`` attention of
:mod:`vitquant.models.vit` computes, with ``q_proj``, ``k_proj`` and ``v_proj`` ``nn.Linear``
modules made by splitting the fused weight. A fused checkpoint (``...attn.qkv.weight`` /
``.bias``) loads into it directly: a load-state-dict pre-hook splits the fused entries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vitquant.methods.qat.quantize import SCHEME_TRANSFORMS
from vitquant.models.layers import MatMul

__all__ = ["SplitAttention", "split_qkv", "split_fused_state_dict"]

_PROJ = ("q_proj", "k_proj", "v_proj")


class SplitAttention(nn.Module):
    """Multi-head self-attention with separate ``q_proj``, ``k_proj``, ``v_proj``.

    Args:
        dim: embedding width.
        num_heads: heads.
        qkv_bias: biases on the three projections.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.qk_matmul = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(0.0)
        self.av_matmul = MatMul()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self._register_load_state_dict_pre_hook(_split_hook)

    @classmethod
    def from_fused(cls, attn: nn.Module) -> SplitAttention:
        """The split equivalent of a fused-``qkv`` attention (weights copied, modules reused)."""
        qkv: nn.Linear = attn.qkv  # type: ignore[assignment]
        dim = qkv.in_features
        new = cls(dim, int(attn.num_heads), qkv.bias is not None)  # type: ignore[arg-type]
        new.scale = float(attn.scale)  # type: ignore[arg-type]
        with torch.no_grad():
            for name, w, b in zip(_PROJ, qkv.weight.chunk(3), _bias_chunks(qkv)):
                lin = getattr(new, name)
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
        for name in ("q_norm", "k_norm", "attn_drop", "proj", "proj_drop"):
            setattr(new, name, getattr(attn, name))
        new.to(qkv.weight.device)
        new.train(attn.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, n, h, d).transpose(1, 2)

        q = self.q_norm(heads(self.q_proj(x)))
        k = self.k_norm(heads(self.k_proj(x)))
        v = heads(self.v_proj(x))
        attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        attn = self.attn_drop(self.softmax(attn))
        x = self.av_matmul(attn, v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


def _bias_chunks(qkv: nn.Linear) -> tuple[Tensor | None, ...]:
    return qkv.bias.chunk(3) if qkv.bias is not None else (None, None, None)


def _split_hook(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for suffix in ("weight", "bias"):
        key = f"{prefix}qkv.{suffix}"
        if key in state_dict:
            for name, part in zip(_PROJ, state_dict.pop(key).chunk(3)):
                state_dict[f"{prefix}{name}.{suffix}"] = part


def split_fused_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A copy of a fused-``qkv`` state dict with ``qkv.*`` split into ``{q,k,v}_proj.*``."""
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        if k.endswith((".qkv.weight", ".qkv.bias")):
            base, suffix = k.rsplit(".qkv.", 1)
            for name, part in zip(_PROJ, v.chunk(3)):
                out[f"{base}.{name}.{suffix}"] = part
        else:
            out[k] = v
    return out


def split_qkv(model: nn.Module) -> nn.Module:
    """Replaces every fused-``qkv`` attention of ``model`` by a :class:`SplitAttention` in place."""
    for name, m in list(model.named_modules()):
        if name and isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "qk_matmul"):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, SplitAttention.from_fused(m))
    return model


def _scheme_split(model: nn.Module, scheme: object) -> None:
    split_qkv(model)


SCHEME_TRANSFORMS["split_qkv"] = _scheme_split

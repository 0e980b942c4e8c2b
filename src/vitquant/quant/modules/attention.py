"""Quantizable equivalents of third-party attention modules and blocks.

Each class computes exactly what the module it replaces computes, but routes q·kᵀ, the softmax,
attn·v and the residual adds through op modules (:class:`QuantMatMul`, :class:`QuantSoftmax`,
:class:`QuantAdd`) that hold quantizers, like the FasterTransformer ViT example's ``Attention`` and
``Block``. They hold the replaced module's submodules and parameters under the same names, so state
dicts are unchanged.

* :class:`QuantAttention` / :class:`QuantBlock`: timm's ``Attention`` / ``Block`` (fused ``qkv``),
  always on the explicit (non-SDPA) path.
* :class:`QuantMultiheadAttention`: ``nn.MultiheadAttention`` re-implemented (packed
  ``in_proj_weight``/``in_proj_bias``, ``out_proj``), with quantizer slots for the input
  projection.
* :class:`QuantTransformerEncoderLayer`: ``nn.TransformerEncoderLayer`` without its fused fast
  path (which would bypass the quantizers), with residual adds as modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.models.layers import Add
from vitquant.quant.modules.base import QuantModule, apply_q
from vitquant.quant.modules.linear import QuantLinear, linear_aftergemm
from vitquant.quant.modules.ops import QuantAdd, QuantMatMul, QuantSoftmax

__all__ = [
    "QuantAttention",
    "QuantBlock",
    "QuantMultiheadAttention",
    "QuantTransformerEncoderLayer",
    "additive_mask",
]


def additive_mask(
    mask: Tensor | None, dtype: torch.dtype, true_means_masked: bool
) -> Tensor | None:
    """Converts a boolean mask to an additive float mask (``-inf`` where masked)."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    masked = mask if true_means_masked else ~mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        masked, float("-inf")
    )


def _adopt_children(new: nn.Module, old: nn.Module) -> None:
    for name, child in old.named_children():
        setattr(new, name, child)
    new.train(old.training)


class QuantAttention(nn.Module):
    """timm ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``,
    ``proj``, ``proj_drop``) with ``qk_matmul``, ``softmax`` and ``av_matmul`` op modules."""

    def __init__(self, num_heads: int, head_dim: int, scale: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.gate: nn.Module | None = None
        self.norm: nn.Module = nn.Identity()
        self.qk_matmul = QuantMatMul("qk")
        self.softmax = QuantSoftmax(dim=-1)
        self.av_matmul = QuantMatMul("av")

    @classmethod
    def from_timm(cls, m: nn.Module) -> QuantAttention:
        """Builds the equivalent of a timm ``Attention`` holding its submodules."""
        head_dim = int(m.head_dim)  # type: ignore[arg-type]
        new = cls(int(m.num_heads), head_dim, float(m.scale))  # type: ignore[arg-type]
        new.attn_dim = int(getattr(m, "attn_dim", new.num_heads * head_dim))
        _adopt_children(new, m)
        return new

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        if is_causal:
            bias: Tensor | None = attn.new_full((n, n), float("-inf")).triu_(1)
        else:
            bias = additive_mask(attn_mask, attn.dtype, true_means_masked=False)
        attn = self.softmax(attn, bias) if bias is not None else self.softmax(attn)
        attn = self.attn_drop(attn)
        x = self.av_matmul(attn, v)
        x = self.norm(x.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantBlock(nn.Module):
    """timm ``Block`` (pre-norm) with the residual adds as ``add1``/``add2`` modules."""

    def __init__(self) -> None:
        super().__init__()
        self.add1 = QuantAdd()
        self.add2 = QuantAdd()

    @classmethod
    def from_timm(cls, m: nn.Module) -> QuantBlock:
        """Builds the equivalent of a timm ``Block`` holding its submodules."""
        new = cls()
        _adopt_children(new, m)
        return new

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        h = self.norm1(x)
        if attn_mask is not None or is_causal:
            h = self.attn(h, attn_mask=attn_mask, is_causal=is_causal)
        else:
            h = self.attn(h)
        x = self.add1(x, self.drop_path1(self.ls1(h)))
        return self.add2(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


class QuantMultiheadAttention(nn.MultiheadAttention, QuantModule):
    """``nn.MultiheadAttention`` computed explicitly, with quantizable ops.

    Slots: ``in_proj_input_quantizer``, ``in_proj_weight_quantizer``, ``in_proj_output_quantizer``
    for the packed input projection; ``qk_matmul``, ``softmax``, ``av_matmul`` and ``out_proj``
    (a :class:`QuantLinear`) carry the others. Supports ``batch_first``, unbatched inputs, boolean
    or float ``attn_mask`` (``(L, S)`` or ``(B*H, L, S)``) and ``key_padding_mask``,
    ``is_causal``, ``need_weights``/``average_attn_weights`` and dropout; not ``bias_k``/``bias_v``,
    ``add_zero_attn`` or separate q/k/v projection weights (``prepare`` leaves those modules
    float).
    """

    quant_points = {
        "in_proj_input_quantizer": "linear_input",
        "in_proj_weight_quantizer": "weight",
        "in_proj_output_quantizer": "aftergemm",
    }
    quant_weights = {"in_proj_weight_quantizer": "in_proj_weight"}

    @staticmethod
    def supported(m: nn.MultiheadAttention) -> bool:
        """True when ``m`` uses only the features this class implements."""
        return (
            bool(m._qkv_same_embed_dim)
            and m.bias_k is None
            and m.bias_v is None
            and not m.add_zero_attn
            and m.in_proj_weight is not None
        )

    @classmethod
    def from_float(cls, m: nn.MultiheadAttention) -> QuantMultiheadAttention:
        """Turns ``m`` into a :class:`QuantMultiheadAttention` in place and returns it."""
        if not cls.supported(m):
            raise ValueError("this nn.MultiheadAttention uses features that cannot be quantized")
        new = super().from_float(m)
        QuantLinear.from_float(new.out_proj)
        new.qk_matmul = QuantMatMul("qk")
        new.softmax = QuantSoftmax(dim=-1)
        new.av_matmul = QuantMatMul("av")
        return new

    def _project(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        x = apply_q(self.in_proj_input_quantizer, x)
        return linear_aftergemm(x, w, b, self.in_proj_output_quantizer)

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        self_attn = query is key and key is value
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tgt_len, embed = query.shape
        src_len = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim

        w = apply_q(self.in_proj_weight_quantizer, self.in_proj_weight)
        if self_attn:
            q, k, v = self._project(query, w, self.in_proj_bias).chunk(3, dim=-1)
        else:
            ws = w.chunk(3)
            bs = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q = self._project(query, ws[0], bs[0])
            k = self._project(key, ws[1], bs[1])
            v = self._project(value, ws[2], bs[2])
        q = q.reshape(bsz, tgt_len, heads, head_dim).transpose(1, 2)
        k = k.reshape(bsz, src_len, heads, head_dim).transpose(1, 2)
        v = v.reshape(bsz, src_len, heads, head_dim).transpose(1, 2)

        dtype = q.dtype
        bias = additive_mask(attn_mask, dtype, true_means_masked=True)
        if bias is None and is_causal:
            bias = torch.full((tgt_len, src_len), float("-inf"), device=q.device).triu_(1)
        if bias is not None and bias.dim() == 3:
            bias = bias.reshape(bsz, heads, tgt_len, src_len)
        kpm = additive_mask(key_padding_mask, dtype, true_means_masked=True)
        if kpm is not None:
            kpm = kpm.reshape(bsz, 1, 1, src_len)
            bias = kpm if bias is None else bias + kpm

        attn = self.qk_matmul(q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1))
        attn = self.softmax(attn, bias) if bias is not None else self.softmax(attn)
        if self.training and self.dropout > 0.0:
            attn = F.dropout(attn, p=self.dropout)
        out = self.av_matmul(attn, v).transpose(1, 2).reshape(bsz, tgt_len, embed)
        out = self.out_proj(out)

        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = attn.mean(dim=1) if average_attn_weights else attn
        return out, weights.squeeze(0) if not batched else weights


class QuantTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that always takes the explicit path (so the quantized
    ``self_attn`` is called), with residual adds as ``add1``/``add2`` (``a`` = skip input)."""

    @classmethod
    def from_float(cls, m: nn.TransformerEncoderLayer) -> QuantTransformerEncoderLayer:
        """Turns ``m`` into a :class:`QuantTransformerEncoderLayer` in place and returns it."""
        m.__class__ = cls
        assert isinstance(m, QuantTransformerEncoderLayer)
        m.add1 = Add()
        m.add2 = Add()
        return m

    def forward(  # type: ignore[override]
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = src
        if self.norm_first:
            x = self.add1(
                x, self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            )
            x = self.add2(x, self._ff_block(self.norm2(x)))
        else:
            x = self.norm1(
                self.add1(x, self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            )
            x = self.norm2(self.add2(x, self._ff_block(x)))
        return x

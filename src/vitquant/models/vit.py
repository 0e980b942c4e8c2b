"""Vision Transformer (Dosovitskiy et al., 2020, arXiv 2010.11929) and DeiT's distilled variant
(Touvron et al., 2021, arXiv 2012.12877), with timm's parameter names and numerics.

File order follows timm: Attention -> Block -> VisionTransformer -> init -> entrypoints. The model
code knows nothing of quantization: every op a quantizer may need (q·kᵀ, softmax, attn·v,
residual adds) goes through a module (:class:`~vitquant.models.layers.MatMul`,
:class:`~vitquant.models.layers.Add`, ``nn.Softmax``) that ``vitquant.quant.prepare`` can swap.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.models.layers import Add, DropPath, LayerScale, MatMul, Mlp, PatchEmbed

__all__ = ["Attention", "Block", "VisionTransformer"]


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm's layout)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.qk_matmul = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.av_matmul = MatMul()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projects tokens ``[B, N, C]`` to ``q, k, v`` of shape ``[B, heads, N, head_dim]``."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.split_qkv(x)
        attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        attn = self.attn_drop(self.softmax(attn))
        x = self.av_matmul(attn, v)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm = norm_layer or _default_norm
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.add1 = Add()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.add2 = Add()

    def forward(self, x: Tensor) -> Tensor:
        x = self.add1(x, self.drop_path1(self.ls1(self.attn(self.norm1(x)))))
        return self.add2(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


def _default_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)


class VisionTransformer(nn.Module):
    """ViT / DeiT image classifier with timm-compatible parameter names.

    Args:
        img_size: input resolution (square int or ``(h, w)``).
        patch_size: patch size of the embedding convolution.
        in_chans: input channels (1 for Fashion-MNIST, 3 for RGB).
        num_classes: classes of the head (0: no head, features only).
        global_pool: ``"token"`` (class token) or ``"avg"`` (mean of patch tokens).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        distilled: add DeiT's distillation token and second head ``head_dist``; outputs average
            the two heads, except in training with ``distilled_training = True``, when the model
            returns ``(cls_logits, dist_logits)``.
        init_values: LayerScale initial value (``None``: no LayerScale).
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: regularisation.
        fc_norm: LayerNorm after pooling instead of before (default: only with ``"avg"`` pooling).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        distilled: bool = False,
        init_values: float | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fc_norm: bool | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', not {global_pool!r}")
        norm = norm_layer or _default_norm
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.distilled = distilled
        self.distilled_training = False
        self.num_prefix_tokens = 2 if distilled else 1

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim)
        )
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = nn.Identity()
        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    proj_drop_rate,
                    attn_drop_rate,
                    init_values,
                    dpr[i],
                    act_layer,
                    norm,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.Identity() if use_fc_norm else norm(embed_dim)
        self.fc_norm = norm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.default_cfg: dict[str, Any] = {}
        self.init_weights()

    # --- init -------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """timm's default init: truncated normal (std 0.02) for linears and embeddings."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                nn.init.trunc_normal_(m.weight, std=math.sqrt(1.0 / fan_in))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head (and ``head_dist``) with fresh ``num_classes`` outputs."""
        self.num_classes = num_classes
        heads = ["head", "head_dist"] if self.distilled else ["head"]
        for name in heads:
            layer = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
            setattr(self, name, layer)

    def no_weight_decay(self) -> set[str]:
        """Parameters that optimizers should not decay (as timm/DeiT)."""
        return {"pos_embed", "cls_token", "dist_token"}

    # --- forward ----------------------------------------------------------------------------
    def _pos_embed(self, x: Tensor) -> Tensor:
        tokens = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(tokens + [x], dim=1) + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Tokens after the last block and final norm: ``[B, prefix + patches, C]``."""
        x = self.patch_embed(x)
        x = self.norm_pre(self._pos_embed(x))
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Pools the tokens and applies the head(s)."""
        if self.distilled:
            x, x_dist = x[:, 0], x[:, 1]
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = self.head(x), self.head_dist(x_dist)
            if self.distilled_training and self.training:
                return x, x_dist
            return (x + x_dist) / 2
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        else:
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.forward_head(self.forward_features(x))

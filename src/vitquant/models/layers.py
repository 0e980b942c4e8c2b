"""Building blocks of the vision transformers: patch embedding, MLP, DropPath, LayerScale, and the
parameter-free op modules (:class:`MatMul`, :class:`Add`) through which the models route every
operation a quantizer may need to see.

Parameter names follow timm (``timm.layers``) so that state dicts load strictly both ways. The op
modules hold no parameters, so they do not change a state dict; ``vitquant.quant.prepare`` swaps
them for quantized versions by name, and the model code itself knows nothing of quantization.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MatMul", "Add", "PatchEmbed", "Mlp", "DropPath", "LayerScale", "to_2tuple"]


def to_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; tuples pass through."""
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class MatMul(nn.Module):
    """``a @ b`` as a module (q·kᵀ and attn·v), so that quantizers can wrap its operands."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(a, b)


class Add(nn.Module):
    """``a + b`` as a module (residual connections): ``a`` is the residual, ``b`` the branch."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution (``patch_embed.proj`` as in timm)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias
        )
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        if (h, w) != self.img_size:
            raise ValueError(
                f"input size {h}x{w} does not match the model's {self.img_size[0]}x"
                f"{self.img_size[1]} (create the model with img_size=...)"
            )
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x)


class Mlp(nn.Module):
    """Transformer MLP: ``fc1 -> act -> drop1 -> norm -> fc2 -> drop2`` (timm's names)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016); identity at evaluation."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Per-channel learnable scale (CaiT); parameter ``gamma`` as in timm."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

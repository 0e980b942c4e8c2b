"""A small causal transformer language model for the DiffQ example.

A GPT-style decoder (Radford et al., 2019; the layout of nanoGPT): token and learnt position
embeddings, pre-norm blocks of causal self-attention (``scaled_dot_product_attention``) and a GELU
MLP, a final LayerNorm and an output layer tied to the token embedding (DiffQ counts the tied
matrix once). It stands in for fairseq's ``transformer_lm`` of DiffQ's WikiText-103 experiments
(Défossez et al., 2021, arXiv 2104.09987) at a size that trains on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vitquant.errors import ConfigError

__all__ = ["LMConfig", "TransformerLM"]


@dataclass
class LMConfig:
    """Shape of :class:`TransformerLM`."""

    vocab_size: int
    dim: int = 128
    depth: int = 2
    heads: int = 4
    max_len: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ConfigError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        if min(self.vocab_size, self.dim, self.depth, self.heads, self.max_len) < 1:
            raise ConfigError("vocab_size, dim, depth, heads and max_len must be >= 1")

    def to_dict(self) -> dict[str, int | float]:
        """Plain dict (for the experiment's ``model.json``)."""
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, is_causal=True
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class TransformerLM(nn.Module):
    """Causal transformer LM: ``forward(ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        if t > self.cfg.max_len:
            raise ConfigError(f"sequence of {t} tokens is longer than max_len={self.cfg.max_len}")
        pos = torch.arange(t, device=ids.device)
        x = self.drop(self.embed(ids) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

"""Q-ViT's information rectification module (IRM) for queries and keys.

Li et al., "Q-ViT: Accurate and Fully Quantized Low-bit Vision Transformer" (NeurIPS 2022,
arXiv 2210.06707), Eq. 10: before quantization, queries and keys are rectified as

    q̃ = γ_q · (q − μ(q) + β_q) / sqrt(σ²(q) + ε)

with learnable ``γ`` and ``β`` (per head and channel), so that their quantized distribution keeps
maximal information (entropy). Where μ and σ² come from is the one choice (``stats``):

* ``"token"``: per token over the head dimension, the released code's ``LayerNorm(head_dim)`` on
  q and k. It discards each token's norm (the temperature of its attention row), so it changes a
  pretrained model's function: on the demo ViT, inserting it costs 9 points of *float* top-1
  before any quantization, whatever γ and β start at.
* ``"channel"`` (default): per head and channel over the tokens of the calibration batches, the
  statistics of the distribution the quantizer sees, kept as buffers. The module is then an affine
  map per channel that starts as the identity (``γ = σ``, ``β = μ``) and learns to move each
  channel's distribution within the quantizer's grid; at inference it folds into the q and k
  projections.

To fine-tune from a float checkpoint the module is *calibrated* first: while ``calibrating`` it
passes its input through unchanged and records statistics; :meth:`finish_calibration` sets
``μ``/``σ`` (``"channel"``) and ``γ``/``β`` so that the rectified q and k start at the float ones
(exactly for ``"channel"``; ``"token"``: ``γ = mean σ``, ``β = mean μ`` per head, exact only when
every token has the same statistics).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["IRM_STATS", "check_irm_stats", "InformationRectification"]

#: where IRM's μ and σ come from
IRM_STATS = ("channel", "token")


def check_irm_stats(stats: str, name: str = "irm_stats") -> str:
    """``stats`` if it is one of :data:`IRM_STATS`; a ``ConfigError`` naming ``name`` if not."""
    if stats not in IRM_STATS:
        from ..errors import ConfigError

        raise ConfigError(f"{name} must be one of {', '.join(IRM_STATS)}, not {stats!r}")
    return stats


class InformationRectification(nn.Module):
    """``γ · (x − μ + β) / sqrt(σ² + ε)`` on ``[B, heads, N, head_dim]``.

    Args:
        num_heads: heads of the attention.
        head_dim: channels per head.
        eps: ``ε`` of the variance.
        stats: ``"channel"`` (μ, σ per head and channel, from calibration) or ``"token"``
            (per token over the head dimension, as ``LayerNorm``).
    """

    def __init__(
        self, num_heads: int, head_dim: int, eps: float = 1e-5, stats: str = "channel"
    ) -> None:
        super().__init__()
        check_irm_stats(stats, "IRM stats")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.eps = eps
        self.stats = stats
        self.gamma = nn.Parameter(torch.ones(num_heads, 1, head_dim))
        self.beta = nn.Parameter(torch.zeros(num_heads, 1, head_dim))
        if stats == "channel":
            self.register_buffer("mean", torch.zeros(num_heads, 1, head_dim))
            self.register_buffer("std", torch.ones(num_heads, 1, head_dim))
        self.calibrating = False
        self._sums: Tensor | None = None
        self._n = 0

    def _token_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = x.mean(dim=-1, keepdim=True)
        return mu, torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self._observe(x.detach())
            return x
        if self.stats == "channel":
            return self.gamma * (x - self.mean + self.beta) / self.std
        mu, sd = self._token_stats(x)
        return self.gamma * (x - mu + self.beta) / sd

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        if self.stats == "channel":
            # per head and channel: count, sum, sum of squares over batch and tokens
            x64 = x.double()
            n = torch.full_like(x64[0, :, 0, :], x64.shape[0] * x64.shape[2])
            stats = torch.stack([n, x64.sum(dim=(0, 2)), x64.pow(2).sum(dim=(0, 2))])
        else:
            mu, sd = self._token_stats(x)
            stats = torch.stack([sd.mean(dim=(0, 2, 3)), mu.mean(dim=(0, 2, 3))])
        self._sums = stats if self._sums is None else self._sums + stats
        self._n += 1

    def start_calibration(self) -> None:
        """Passes inputs through unchanged and records their statistics."""
        self.calibrating = True
        self._sums, self._n = None, 0

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Sets the statistics, ``γ`` and ``β`` from what was recorded (unchanged if nothing)."""
        self.calibrating = False
        if self._sums is None:
            return
        if self.stats == "channel":
            n, s, s2 = self._sums.unbind(0)
            mu = s / n
            sd = torch.sqrt((s2 / n - mu.pow(2)).clamp_min(0) + self.eps)
            shape = self.mean.shape
            self.mean.copy_(mu.reshape(shape))
            self.std.copy_(sd.reshape(shape))
            self.gamma.copy_(sd.reshape(shape))
            self.beta.copy_(mu.reshape(shape))
        else:
            sigma, mu = (self._sums / self._n).unbind(0)
            self.gamma.copy_(sigma.reshape(-1, 1, 1).expand_as(self.gamma))
            self.beta.copy_(mu.reshape(-1, 1, 1).expand_as(self.beta))
        self._sums, self._n = None, 0

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}, "
            f"stats={self.stats!r}"
        )

"""Q-ViT's information rectification module (IRM) for queries and keys.

Li et al., "Q-ViT: Accurate and Fully Quantized Low-bit Vision Transformer" (NeurIPS 2022,
arXiv 2210.06707), Eq. 10: before quantization, queries and keys are rectified as

    q̃ = γ_q · (q − μ(q) + β_q) / sqrt(σ²(q) + ε)

with learnable ``γ`` and ``β``, so that their quantized distribution keeps maximal information
(entropy). μ and σ² are taken per token over the head dimension (the released code's
``LayerNorm(head_dim)`` on q and k); ``γ`` and ``β`` are per head and channel.

Inserting a normalisation into a pretrained model changes its function. To fine-tune from a
float checkpoint, the module can be *calibrated* first: while ``calibrating`` it passes its input
through unchanged and records the mean token statistics, and :meth:`finish_calibration` sets
``γ = mean σ`` and ``β = mean μ`` per head, so that the rectified q and k start at the scale and
offset of the float ones (exactly equal when every token has the same statistics).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["InformationRectification"]


class InformationRectification(nn.Module):
    """``γ · (x − μ + β) / sqrt(σ² + ε)`` over the last dimension of ``[B, heads, N, head_dim]``.

    Args:
        num_heads: heads of the attention.
        head_dim: channels per head.
        eps: ``ε`` of the variance.
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(num_heads, 1, head_dim))
        self.beta = nn.Parameter(torch.zeros(num_heads, 1, head_dim))
        self.calibrating = False
        self._sums: Tensor | None = None
        self._n = 0

    def forward(self, x: Tensor) -> Tensor:
        mu = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, unbiased=False, keepdim=True)
        if self.calibrating:
            with torch.no_grad():
                stats = torch.stack(
                    [torch.sqrt(var + self.eps).mean(dim=(0, 2, 3)), mu.mean(dim=(0, 2, 3))]
                )
                self._sums = stats if self._sums is None else self._sums + stats
                self._n += 1
            return x
        return self.gamma * (x - mu + self.beta) / torch.sqrt(var + self.eps)

    def start_calibration(self) -> None:
        """Passes inputs through unchanged and records their mean token statistics."""
        self.calibrating = True
        self._sums, self._n = None, 0

    def finish_calibration(self) -> None:
        """Sets ``γ`` and ``β`` from the recorded statistics (unchanged if none were seen)."""
        self.calibrating = False
        if self._sums is None:
            return
        sigma, mu = (self._sums / self._n).unbind(0)
        with torch.no_grad():
            self.gamma.copy_(sigma.reshape(-1, 1, 1).expand_as(self.gamma))
            self.beta.copy_(mu.reshape(-1, 1, 1).expand_as(self.beta))
        self._sums, self._n = None, 0

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}"

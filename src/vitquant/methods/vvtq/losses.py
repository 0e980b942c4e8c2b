"""VVTQ's losses (Huang et al., TMLR 2024, arXiv 2307.00331).

* :func:`soft_cross_entropy`: the soft-label cross-entropy ``-Σ p·log softmax(z)`` that VVTQ
  trains with on FKD soft labels (Shen & Xing, 2021);
* :func:`bin_regularizer` and :class:`CosineRampSchedule`: VVTQ's ``--reg``: dampening toward the
  bin centres plus the spread of each quantization bin (bin regularisation, Xu et al., ICCV 2021),
  weighted by a cosine ramp that is zero for the first quarter of training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vitquant.errors import ConfigError

__all__ = ["soft_cross_entropy", "bin_regularizer", "CosineRampSchedule"]


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``mean_batch(-Σ_c p_c · log softmax(z)_c)`` for soft targets ``p`` (rows sum to one).

    Args:
        logits: ``[B, C]``.
        target: ``[B, C]`` probabilities.
    """
    if logits.shape != target.shape:
        raise ConfigError(
            f"soft labels have shape {tuple(target.shape)} but the logits {tuple(logits.shape)}"
        )
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def bin_regularizer(weight: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """VVTQ's bin regulariser of one weight tensor, in weight units.

    With ``c = clamp(w, qmin·s, qmax·s)`` and ``b = round(c / s)`` (the integer bin):
    ``mean((b·s − c)²) + Σ_bins Var(c in bin)``. The first term dampens weights toward their bin
    centre, the second shrinks each bin's spread. The scale is detached (the regulariser shapes the
    weights, not the grid); empty and single-element bins contribute nothing to the variance term.
    Bins are summed with ``scatter_add`` instead of the original's Python loop over ``2^b`` bins.

    Args:
        weight: any shape.
        scale: a scalar or a tensor broadcastable against ``weight`` (per channel: expanded).
        qmin, qmax: the integer grid.
    """
    s = scale.detach()
    c = torch.maximum(torch.minimum(weight, qmax * s), qmin * s)
    bins = torch.clamp(torch.round(c / s), qmin, qmax)
    damp = ((bins * s - c) ** 2).mean()
    idx = (bins - qmin).long().flatten()
    nbins = qmax - qmin + 1
    flat = c.flatten()
    count = torch.zeros(nbins, device=flat.device, dtype=flat.dtype).scatter_add_(
        0, idx, torch.ones_like(flat)
    )
    total = torch.zeros_like(count).scatter_add_(0, idx, flat)
    valid = count > 1
    mean = total / count.clamp(min=1)
    # two-pass unbiased variance (as torch.var): Σ(x − mean_bin)² / (n − 1)
    sq = torch.zeros_like(count).scatter_add_(0, idx, (flat - mean[idx]) ** 2)
    var = sq / (count - 1).clamp(min=1)
    return damp + torch.where(valid, var, torch.zeros_like(var)).sum()


class CosineRampSchedule:
    """Weight of the bin regulariser over training (VVTQ's ``CosineTempDecay(t_max, (0, 0.01),
    start=0.25)``): ``start`` until ``ramp_start·t_max``, then a half cosine to ``end`` at
    ``t_max``.

    Args:
        t_max: length of training (epochs or steps, in the unit the caller passes to ``__call__``).
        start: value before the ramp (VVTQ: 0).
        end: value at ``t_max`` (VVTQ: 0.01).
        ramp_start: fraction of ``t_max`` before which the value stays ``start`` (VVTQ: 0.25).
    """

    def __init__(
        self, t_max: float, start: float = 0.0, end: float = 0.01, ramp_start: float = 0.25
    ) -> None:
        if t_max <= 0:
            raise ConfigError(f"schedule length must be > 0, got {t_max}")
        if not 0 <= ramp_start < 1:
            raise ConfigError(f"ramp_start must be in [0, 1), got {ramp_start}")
        self.t_max = float(t_max)
        self.start = float(start)
        self.end = float(end)
        self.ramp_start = float(ramp_start)

    def __call__(self, t: float) -> float:
        t0 = self.ramp_start * self.t_max
        if t < t0:
            return self.start
        rel = min((t - t0) / (self.t_max - t0), 1.0)
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(rel * math.pi))

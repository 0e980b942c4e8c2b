"""Losses of the quantization-aware training methods.

* :func:`dgd_loss` — Q-ViT's distribution-guided distillation (Li et al., NeurIPS 2022,
  arXiv 2210.06707, Eq. 12-13): row-normalised patch-similarity matrices ``q·qᵀ`` and ``k·kᵀ`` of
  the float teacher and the quantized student, compared per layer and head. The original code
  never shipped it (Q-ViT issues #14, #16); this follows the paper's equations.
* :func:`soft_cross_entropy` — the soft-label cross-entropy ``-Σ p·log softmax(z)`` that VVTQ
  (Huang et al., TMLR 2024, arXiv 2307.00331) trains with on FKD soft labels (Shen & Xing, 2021).
* :func:`kl_distillation` — Hinton's ``KL(softmax(t/T) ‖ softmax(s/T))``; with
  ``reduction="mean"`` and no ``T²`` factor it is FasterTransformer's QAT distillation term
  (``10000·KLDivLoss(log_softmax(s/3), softmax(t/3))``, element mean).
* :func:`bin_regularizer` and :class:`CosineRampSchedule` — VVTQ's ``--reg``: dampening toward the
  bin centres plus the spread of each quantization bin (bin regularisation, Xu et al., ICCV 2021),
  weighted by a cosine ramp that is zero for the first quarter of training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vitquant.errors import ConfigError

__all__ = [
    "similarity_matrix",
    "dgd_loss",
    "soft_cross_entropy",
    "kl_distillation",
    "bin_regularizer",
    "CosineRampSchedule",
]


def similarity_matrix(x: Tensor, eps: float = 1e-12, rel_floor: float = 1e-2) -> Tensor:
    """Row-ℓ2-normalised Gram matrix ``G̃ = normalize(x·xᵀ)`` over the token axis.

    A row whose norm is below ``rel_floor`` times the mean row norm of its matrix is divided by
    that floor instead of its own norm. At 2 bits a token's quantized query or key is often all
    zeros; plain normalisation then has a gradient of ``1/eps`` there (about 10¹²), which, after
    gradient clipping, leaves nothing of the rest of the update (DGD collapsed 2-bit training
    to 80 % on the demo model before the floor). Rows of a float teacher are far above it.

    Args:
        x: ``[..., N, D]`` (e.g. queries ``[B, heads, N, head_dim]``).
        eps: absolute floor of the row norms.
        rel_floor: floor relative to the mean row norm of each matrix (detached).

    Returns:
        ``[..., N, N]``; rows have unit ℓ2 norm unless under the floor (then shorter; zero when
        the row of ``x·xᵀ`` is).
    """
    g = torch.matmul(x, x.transpose(-2, -1))
    norms = g.norm(p=2, dim=-1, keepdim=True)
    floor = (rel_floor * norms.detach().mean(dim=-2, keepdim=True)).clamp_min(eps)
    return g / torch.maximum(norms, floor)


def dgd_loss(
    student: Sequence[tuple[Tensor, Tensor]],
    teacher: Sequence[tuple[Tensor, Tensor]],
    reduction: str = "mean",
    average_terms: bool = False,
) -> Tensor:
    """Distribution-guided distillation (Q-ViT, Eq. 13).

    ``L = Σ_l Σ_h ‖G̃_q,T − G̃_q,S‖₂ + ‖G̃_k,T − G̃_k,S‖₂`` with ``G̃`` from
    :func:`similarity_matrix` and ``‖·‖₂`` the Frobenius norm of the ``N×N`` difference, computed
    per image; images are averaged (``"mean"``) or summed (``"sum"``). The teacher side is detached.

    Args:
        student: per layer ``(q, k)``, each ``[B, heads, N, head_dim]`` (student's quantized
            queries and keys).
        teacher: the same for the float teacher; same layer count, batch, heads and tokens.
        reduction: ``"mean"`` or ``"sum"`` over the batch.
        average_terms: divide by the number of terms (2 · layers · heads) instead of summing
            them (the paper's sum grows with depth and heads and, at weight 1, swamps the
            cross-entropy: about 100x on the 6-layer, 4-head demo model).

    Returns:
        A scalar; zero when the student's similarity matrices equal the teacher's.

    Raises:
        ConfigError: layer counts or shapes differ, or an unknown reduction.
    """
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"dgd_loss reduction must be 'mean' or 'sum', not {reduction!r}")
    if len(student) != len(teacher):
        raise ConfigError(
            f"DGD needs the same number of attention layers in teacher ({len(teacher)}) and "
            f"student ({len(student)})"
        )
    if not student:
        raise ConfigError("DGD got no attention layers (were q/k captured?)")
    total: Tensor | None = None
    terms = 0
    for (qs, ks), (qt, kt) in zip(student, teacher):
        for s, t in ((qs, qt), (ks, kt)):
            if s.shape[:-1] != t.shape[:-1]:
                raise ConfigError(
                    f"DGD needs matching [batch, heads, tokens] in teacher and student, got "
                    f"{tuple(t.shape[:-1])} and {tuple(s.shape[:-1])}"
                )
            diff = similarity_matrix(t.detach().float()) - similarity_matrix(s.float())
            per_head = diff.flatten(-2).norm(p=2, dim=-1)  # [B, heads]
            term = per_head.reshape(per_head.shape[0], -1).sum(dim=1)  # [B]
            terms += per_head[0].numel()
            total = term if total is None else total + term
    assert total is not None
    if average_terms:
        total = total / terms
    return total.mean() if reduction == "mean" else total.sum()


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


def kl_distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tau: float = 1.0,
    reduction: str = "batchmean",
    tau_squared: bool = True,
) -> Tensor:
    """``KL(softmax(t/τ) ‖ softmax(s/τ))``, optionally times ``τ²`` (Hinton et al., 2015).

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]``; detached here.
        tau: temperature ``τ > 0``.
        reduction: ``"batchmean"`` (sum over classes, mean over images: the true KL) or
            ``"mean"`` (mean over every element, as ``torch.nn.KLDivLoss()``'s default that
            FasterTransformer's QAT uses with its weight 10000).
        tau_squared: multiply by ``τ²`` (keeps gradient magnitudes independent of ``τ``).
    """
    if tau <= 0:
        raise ConfigError(f"distillation temperature must be > 0, got {tau}")
    if reduction not in ("batchmean", "mean"):
        raise ConfigError("kl_distillation reduction must be 'batchmean' or 'mean'")
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"teacher has {teacher_logits.shape[-1]} outputs but the student "
            f"{student_logits.shape[-1]}: their classes differ"
        )
    log_p = F.log_softmax(student_logits / tau, dim=-1)
    log_q = F.log_softmax(teacher_logits.detach() / tau, dim=-1)
    kl = F.kl_div(log_p, log_q, reduction="sum", log_target=True)
    loss = kl / (student_logits.numel() if reduction == "mean" else student_logits.shape[0])
    return loss * (tau * tau) if tau_squared else loss


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

"""Q-ViT's distribution-guided distillation (Li et al., NeurIPS 2022, arXiv 2210.06707, Eq. 12-13).

:func:`dgd_loss`: row-normalised patch-similarity matrices ``q·qᵀ`` and ``k·kᵀ`` of the float
teacher and the quantized student, compared per layer and head. The original code never shipped
it (Q-ViT issues #14, #16); this follows the paper's equations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vitquant.errors import ConfigError

__all__ = ["similarity_matrix", "dgd_loss"]


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

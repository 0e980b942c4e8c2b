"""FasterTransformer QAT's distillation term.

:func:`kl_distillation`: Hinton's ``KL(softmax(t/T) ‖ softmax(s/T))``; with ``reduction="mean"``
and no ``T²`` factor it is FasterTransformer's QAT distillation term
(``10000·KLDivLoss(log_softmax(s/3), softmax(t/3))``, element mean).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from vitquant.errors import ConfigError

__all__ = ["kl_distillation"]


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

"""Training losses: label-smoothed cross-entropy and DeiT's distillation losses.

Label smoothing: Szegedy et al., "Rethinking the Inception Architecture" (CVPR 2016, arXiv
1512.00567). Distillation: Touvron et al., "Training data-efficient image transformers &
distillation through attention" (DeiT, ICML 2021, arXiv 2012.12877), as its ``losses.py`` defines
it:

* ``none``: ``CE(cls, y)``;
* ``soft``: ``(1-α)·CE(cls, y) + α·τ²·KL(softmax(t/τ) ‖ softmax(dist/τ))``, with the KL summed and
  divided by the number of logits (``batch × classes``), as DeiT does;
* ``hard``: ``(1-α)·CE(cls, y) + α·CE(dist, argmax t)``.

``cls`` and ``dist`` are the two heads of a distilled DeiT in training; a model with a single head
uses it for both. QAT methods add their own losses in their own files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.errors import ConfigError

__all__ = ["smoothed_cross_entropy", "soft_distillation", "DistillationLoss"]


def smoothed_cross_entropy(logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy with label smoothing.

    Args:
        logits: ``[B, C]``.
        target: class indices ``[B]``, or soft targets ``[B, C]`` (probabilities; then
            ``smoothing`` mixes them with the uniform distribution).
        smoothing: weight ``ε`` of the uniform distribution: the target is
            ``(1-ε)·onehot + ε/C``.

    Returns:
        The scalar loss.
    """
    if target.ndim == logits.ndim:
        num_classes = logits.shape[-1]
        soft = target.float() * (1.0 - smoothing) + smoothing / num_classes
        return torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


def soft_distillation(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """DeiT's soft distillation term ``τ²·KL(p_t ‖ p_s) / numel`` (KL summed over all logits)."""
    kl = F.kl_div(
        F.log_softmax(student.float() / tau, dim=1),
        F.log_softmax(teacher.float() / tau, dim=1),
        reduction="sum",
        log_target=True,
    )
    return kl * (tau * tau) / student.numel()


class DistillationLoss(nn.Module):
    """Label-smoothed CE plus, optionally, DeiT's soft or hard distillation from a teacher.

    Args:
        teacher: the frozen teacher (evaluated under ``no_grad`` in eval mode); ``None`` with
            ``distillation_type="none"``.
        distillation_type: ``"none"``, ``"soft"`` or ``"hard"``.
        alpha: weight ``α`` of the distillation term.
        tau: temperature ``τ`` of the soft term.
        smoothing: label smoothing of the CE on the class head.

    Example:
        >>> crit = DistillationLoss(teacher, "hard", alpha=0.5, tau=1.0, smoothing=0.1)
        >>> loss, logs = crit(images, model(images), labels)
    """

    def __init__(
        self,
        teacher: nn.Module | None = None,
        distillation_type: str = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
        smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if distillation_type not in ("none", "soft", "hard"):
            raise ConfigError(f"distillation type must be none, soft or hard: {distillation_type}")
        if distillation_type != "none" and teacher is None:
            raise ConfigError(f"{distillation_type} distillation needs a teacher")
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau
        self.smoothing = smoothing

    def teacher_logits(self, inputs: Tensor) -> Tensor:
        """The teacher's logits for ``inputs`` (no gradient)."""
        assert self.teacher is not None
        with torch.no_grad():
            out = self.teacher(inputs)
        if isinstance(out, tuple):
            out = (out[0] + out[1]) / 2
        return out

    def forward(  # type: ignore[override]
        self, inputs: Tensor, outputs: Tensor | tuple[Tensor, Tensor], target: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Returns ``(loss, logs)``; ``logs`` holds the parts as floats (``ce``, ``kd``)."""
        if isinstance(outputs, tuple):
            cls_out, dist_out = outputs
        else:
            cls_out = dist_out = outputs
        base = smoothed_cross_entropy(cls_out, target, self.smoothing)
        if self.distillation_type == "none":
            return base, {"ce": float(base.detach())}
        t = self.teacher_logits(inputs)
        if t.shape != dist_out.shape:
            raise ConfigError(
                f"teacher outputs {tuple(t.shape)[1:]} classes but the student "
                f"{tuple(dist_out.shape)[1:]}"
            )
        if self.distillation_type == "soft":
            kd = soft_distillation(dist_out, t, self.tau)
        else:
            kd = F.cross_entropy(dist_out.float(), t.argmax(dim=1))
        loss = (1 - self.alpha) * base + self.alpha * kd
        return loss, {"ce": float(base.detach()), "kd": float(kd.detach())}

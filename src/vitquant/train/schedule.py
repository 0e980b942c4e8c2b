"""Learning-rate schedule: linear warm-up then cosine decay, updated every step.

The cosine of Loshchilov & Hutter, "SGDR" (ICLR 2017, arXiv 1608.03983), without restarts, after a
linear warm-up (Goyal et al., 2017, arXiv 1706.02677), as DeiT trains (timm's ``CosineLRScheduler``
with ``warmup_t``), but per optimizer step rather than per epoch. Each parameter group keeps the
ratio of its own ``initial_lr`` to the base lr, so groups with their own learning rate (e.g.
quantizer step sizes) follow the same curve.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["CosineSchedule", "cosine_lr"]


def cosine_lr(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_lr: float = 0.0,
    min_lr: float = 0.0,
) -> float:
    """Learning rate at ``step`` (0-based) of a warm-up + cosine schedule.

    Steps ``0 .. warmup_steps-1`` go linearly from ``warmup_lr`` toward ``base_lr``; then
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t / T)) / 2`` with ``t = step - warmup_steps``,
    ``T = total_steps - warmup_steps``; steps past the end stay at ``min_lr``.
    """
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(step - warmup_steps, span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t / span))


class CosineSchedule:
    """Sets the learning rate of every group of some optimizers before each step.

    Args:
        optimizers: the optimizers whose groups follow the schedule (their ``initial_lr``).
        base_lr: the peak learning rate the curve is defined for.
        total_steps: length of the whole run in steps.
        warmup_steps: linear warm-up steps.
        warmup_lr: learning rate at step 0.
        min_lr: learning rate at the end.

    Example:
        >>> sched = CosineSchedule([opt], base_lr=1e-3, total_steps=1000, warmup_steps=100)
        >>> for batch in loader:
        ...     sched.step()  # sets the lr of this step, then counts it
        ...     opt.step()
    """

    def __init__(
        self,
        optimizers: list[torch.optim.Optimizer],
        *,
        base_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_lr: float = 0.0,
        min_lr: float = 0.0,
    ) -> None:
        self.optimizers = optimizers
        self.base_lr = base_lr
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_lr = warmup_lr
        self.min_lr = min_lr
        self.last_step = 0
        for opt in optimizers:
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])

    def lr_at(self, step: int) -> float:
        """The base-group learning rate at ``step``."""
        return cosine_lr(
            step,
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            warmup_lr=self.warmup_lr,
            min_lr=self.min_lr,
        )

    def step(self) -> float:
        """Applies the learning rate of the current step to all groups and advances; returns it."""
        lr = self.lr_at(self.last_step)
        factor = lr / self.base_lr
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * factor
        self.last_step += 1
        return lr

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position and settings."""
        return {
            "last_step": self.last_step,
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position (settings come from the config)."""
        self.last_step = int(state["last_step"])

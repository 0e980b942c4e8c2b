"""Optimizers: AdamW and SGD (torch's), LAMB (written here), and weight-decay parameter groups.

LAMB follows You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes" (ICLR 2020, arXiv 1904.00962), Algorithm 2: Adam moments with bias correction, decoupled
weight decay added to the Adam direction, and a per-parameter trust ratio ``||w|| / ||update||``
(1 where either norm is 0). Q-ViT trains with it (DeiT's ``--opt fusedlamb``).

Parameter groups follow timm/DeiT: 1-d parameters (biases, norms), and the names a model lists in
``no_weight_decay()`` (``pos_embed``, ``cls_token``, ``dist_token``) get no weight decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from vitquant.errors import ConfigError
from vitquant.methods.base import param_groups_weight_decay

__all__ = ["Lamb", "build_optimizer", "param_groups_weight_decay"]


class Lamb(torch.optim.Optimizer):
    """Layer-wise Adaptive Moments for Batch training (LAMB).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: coefficients of the first and second moment averages.
        eps: added to the square root of the second moment.
        weight_decay: decoupled weight decay, added to the Adam direction before the trust ratio.

    Example:
        >>> opt = Lamb(model.parameters(), lr=2e-3, weight_decay=0.05)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"invalid LAMB settings lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                w = p.float()
                if group["weight_decay"] != 0:
                    update = update + group["weight_decay"] * w
                w_norm, u_norm = w.norm(), update.norm()
                ratio = torch.where(
                    (w_norm > 0) & (u_norm > 0), w_norm / u_norm.clamp_min(1e-30), 1.0
                )
                p.add_((update * (-group["lr"] * ratio)).to(p.dtype))
        return loss


def build_optimizer(
    name: str,
    param_groups: list[dict[str, Any]],
    *,
    lr: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Creates ``"adamw"``, ``"sgd"`` (Nesterov-free, with momentum) or ``"lamb"``.

    Args:
        name: optimizer name.
        param_groups: groups as from :func:`param_groups_weight_decay`; a group may set its own
            ``lr`` and ``weight_decay``.
        lr: default learning rate.
        momentum: SGD momentum.
        betas: AdamW/LAMB betas.
        eps: AdamW/LAMB epsilon.

    Returns:
        The optimizer. Each group remembers its initial lr as ``initial_lr`` for the schedule.
    """
    for g in param_groups:
        g.setdefault("initial_lr", g.get("lr", lr))
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum)
    if name == "lamb":
        return Lamb(param_groups, lr=lr, betas=betas, eps=eps)
    raise ConfigError(f"unknown optimizer {name!r}; choose adamw, sgd or lamb")

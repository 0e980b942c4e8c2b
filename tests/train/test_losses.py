"""Label smoothing and DeiT distillation losses against hand re-derivations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitquant.errors import ConfigError
from vitquant.train.losses import DistillationLoss, smoothed_cross_entropy


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_label_smoothing_matches_numpy() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    eps = 0.2
    q = np.full((6, 4), eps / 4) + (1 - eps) * np.eye(4)[y.numpy()]
    ref = -(q * _np_log_softmax(logits.numpy())).sum(axis=1).mean()
    assert float(smoothed_cross_entropy(logits, y, eps)) == pytest.approx(ref, rel=1e-6)
    onehot = F.one_hot(y, 4).double()
    assert float(smoothed_cross_entropy(logits, onehot, eps)) == pytest.approx(ref, rel=1e-6)


class _Fixed(nn.Module):
    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def test_soft_distillation_deit_formula() -> None:
    torch.manual_seed(1)
    cls, dist, t = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])
    tau, alpha = 2.0, 0.3
    crit = DistillationLoss(_Fixed(t), "soft", alpha=alpha, tau=tau, smoothing=0.0)
    loss, logs = crit(torch.zeros(5, 1), (cls, dist), y)
    ps = _np_log_softmax(dist.numpy().astype(np.float64) / tau)
    pt = _np_log_softmax(t.numpy().astype(np.float64) / tau)
    kl = (np.exp(pt) * (pt - ps)).sum() * tau * tau / dist.numel()
    ce = -_np_log_softmax(cls.numpy().astype(np.float64))[np.arange(5), y.numpy()].mean()
    assert float(loss) == pytest.approx((1 - alpha) * ce + alpha * kl, rel=1e-5)
    assert logs["kd"] == pytest.approx(kl, rel=1e-5) and logs["ce"] == pytest.approx(ce, rel=1e-5)


def test_hard_distillation_single_head() -> None:
    torch.manual_seed(2)
    out, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([1, 1, 2, 3])
    crit = DistillationLoss(_Fixed(t), "hard", alpha=0.5, smoothing=0.1)
    loss, _ = crit(torch.zeros(4, 1), out, y)
    ref = 0.5 * F.cross_entropy(out, y, label_smoothing=0.1) + 0.5 * F.cross_entropy(
        out, t.argmax(1)
    )
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_teacher_class_mismatch_and_missing_teacher() -> None:
    crit = DistillationLoss(_Fixed(torch.randn(2, 7)), "hard")
    with pytest.raises(ConfigError, match="classes"):
        crit(torch.zeros(2, 1), torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ConfigError):
        DistillationLoss(None, "soft")

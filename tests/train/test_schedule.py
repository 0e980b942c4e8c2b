"""Warm-up + cosine schedule against torch's LinearLR + CosineAnnealingLR."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitquant.train.schedule import CosineSchedule, cosine_lr


def test_matches_torch_sequential_schedule() -> None:
    base, warm_lr, min_lr, warm, total = 0.1, 0.01, 0.001, 5, 30
    p = nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([p], lr=base)
    ref = torch.optim.lr_scheduler.SequentialLR(
        ref_opt,
        [
            torch.optim.lr_scheduler.LinearLR(
                ref_opt, start_factor=warm_lr / base, end_factor=1.0, total_iters=warm
            ),
            torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=total - warm, eta_min=min_lr),
        ],
        milestones=[warm],
    )
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    sched = CosineSchedule(
        [opt], base_lr=base, total_steps=total, warmup_steps=warm, warmup_lr=warm_lr, min_lr=min_lr
    )
    for _ in range(total):
        mine = sched.step()
        assert mine == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        assert opt.param_groups[0]["lr"] == pytest.approx(mine)
        ref_opt.step()
        ref.step()


def test_groups_keep_their_ratio_and_state_resumes() -> None:
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q], "lr": 0.01}], lr=0.1)
    sched = CosineSchedule([opt], base_lr=0.1, total_steps=10, warmup_steps=2)
    for _ in range(4):
        sched.step()
    g0, g1 = opt.param_groups
    assert g1["lr"] == pytest.approx(g0["lr"] / 10)
    other = CosineSchedule([opt], base_lr=0.1, total_steps=10, warmup_steps=2)
    other.load_state_dict(sched.state_dict())
    assert other.step() == pytest.approx(sched.step())


def test_endpoints() -> None:
    kw = dict(base_lr=1.0, total_steps=10, warmup_steps=0, min_lr=0.1)
    assert cosine_lr(0, **kw) == pytest.approx(1.0)
    assert cosine_lr(10, **kw) == pytest.approx(0.1)
    assert cosine_lr(50, **kw) == pytest.approx(0.1)
    assert cosine_lr(0, base_lr=1.0, total_steps=10, warmup_steps=4, warmup_lr=0.0) == 0.0

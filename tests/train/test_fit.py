"""``fit`` in-process: optimizers, bf16 autocast, DeiT distillation of a distilled student,
time-based checkpoints, and the engine's evaluation against a plain re-computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitquant import create_model
from vitquant.train import TrainConfig, evaluate, fit
from vitquant.train.checkpoint import load_checkpoint

TINY = dict(
    model="vit_nano_patch4_28",
    data_path="digits",
    epochs=1,
    batch_size=32,
    train_subset=96,
    eval_subset=64,
    lr=0.002,
    warmup_epochs=0.5,
)


@pytest.mark.parametrize("opt", ["sgd", "lamb"])
def test_other_optimizers_train(opt: str, tmp_path: Path) -> None:
    res = fit(TrainConfig(**TINY, opt=opt, clip_grad=1.0), exp_dir=tmp_path, quiet=True)
    assert 0 <= res["top1"] <= 100 and res["train_loss"] == res["train_loss"]


def test_amp_on_cpu_and_time_based_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(**TINY, amp=True, save_every_minutes=1e-9)
    res = fit(cfg, exp_dir=tmp_path, quiet=True)
    assert res["loss"] == res["loss"]  # not NaN
    state = load_checkpoint(tmp_path / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 0)


def test_distilled_student_with_hard_distillation(tmp_path: Path) -> None:
    teacher_run = tmp_path / "teacher"
    fit(TrainConfig(**TINY), exp_dir=teacher_run, quiet=True)
    cfg = TrainConfig(
        **{**TINY, "model": "deit_nano_distilled_patch4_28"},
        teacher=str(teacher_run),
        distillation_type="hard",
        distillation_alpha=0.5,
    )
    fit(cfg, exp_dir=tmp_path / "student", quiet=True)
    log = json.loads((tmp_path / "student" / "log.jsonl").read_text().splitlines()[-1])
    assert log["train_kd"] > 0 and log["train_ce"] > 0


def test_evaluate_matches_plain_computation() -> None:
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_28").eval()
    x, y = torch.randn(50, 1, 28, 28), torch.randint(0, 10, (50,))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 50, 16)]
    m = evaluate(model, batches, torch.device("cpu"))
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices
    assert m["images"] == 50
    assert m["top1"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert m["top5"] == pytest.approx(100 * (top5 == y[:, None]).any(1).float().mean().item())
    assert m["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


@pytest.mark.gpu
def test_cuda_bf16_run(tmp_path: Path) -> None:
    res = fit(TrainConfig(**TINY, device="cuda"), exp_dir=tmp_path, quiet=True)
    assert res["loss"] == res["loss"]

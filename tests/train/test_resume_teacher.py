"""A resumed run distils from the same teacher as the uninterrupted run.

Q-ViT's DGD and ft-qat's KL term distil from a frozen copy of the float model the run starts from
(``--finetune``). A run killed mid-epoch and started again must rebuild that teacher from the same
weights (and ft-qat its calibration from the same float model), so that its final weights and
metrics are those of the run that was never stopped.

The kill is emulated in-process: ``os._exit``, which ``fit(stop_after_steps=...)`` calls after the
last step it runs, raises instead; ``last.pt`` then holds that step (``save_every_steps=1``) or the
end of the last finished epoch (``save_every_steps=0``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from vitquant import create_model
from vitquant.train import TrainConfig, fit
from vitquant.train.checkpoint import load_checkpoint
from vitquant.train.trainer import STOP_EXIT_CODE

MODEL = "vit_nano_patch4_28"
TINY: dict[str, Any] = dict(
    model=MODEL,
    data_path="digits",
    epochs=2,
    batch_size=16,
    train_subset=64,  # 4 steps per epoch
    eval_subset=32,
    lr=1e-3,
    warmup_epochs=0,
)
METHODS: dict[str, dict[str, Any]] = {
    "qvit": {"wbits": 4, "abits": 4, "calib_batches": 1, "dgd": True, "dgd_weight": 10.0},
    "ft-qat": {"wbits": 4, "abits": 4, "calib_batches": 1, "kd_weight": 100.0},
}


class _Killed(BaseException):
    """Stands for the end of a process killed by ``os._exit``."""


@pytest.fixture(scope="module")
def float_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Float weights unlike the student's own initialisation (another seed), as a ``.pth``."""
    torch.manual_seed(1234)
    model = create_model(MODEL, num_classes=10, in_chans=1)
    path = tmp_path_factory.mktemp("float") / "float.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(
    float_weights: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Each method's run that was never stopped: its result and final weights."""
    out: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for method in METHODS:
        exp = tmp_path_factory.mktemp(method) / "run"
        res = fit(_cfg(method, float_weights, exp, 0), exp_dir=exp, quiet=True)
        out[method] = res, load_checkpoint(exp / "last.pt")["model"]
    return out


def _cfg(method: str, finetune: str, out: Path, save_every_steps: int) -> TrainConfig:
    return TrainConfig(
        **TINY,
        method=method,
        method_args=METHODS[method],
        finetune=finetune,
        output=str(out),
        save_every_steps=save_every_steps,
    )


def _kill(code: int) -> None:
    assert code == STOP_EXIT_CODE
    raise _Killed


@pytest.mark.parametrize(
    ("stop", "save_every", "at"),
    [(3, 1, (0, 3)), (5, 0, (1, 0))],
    ids=["mid-epoch", "epoch-boundary"],
)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_killed_run_resumes_with_the_same_teacher(
    method: str,
    stop: int,
    save_every: int,
    at: tuple[int, int],
    float_weights: str,
    uninterrupted: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exp = tmp_path / "run"
    cfg = _cfg(method, float_weights, exp, save_every)
    with monkeypatch.context() as m:
        m.setattr(os, "_exit", _kill)
        with pytest.raises(_Killed):  # killed after `stop` steps (4 per epoch)
            fit(cfg, exp_dir=exp, stop_after_steps=stop, quiet=True)
    state = load_checkpoint(exp / "last.pt")
    assert (state["epoch"], state["step"]) == at
    resumed = fit(cfg, exp_dir=exp, quiet=True)
    whole, weights = uninterrupted[method]
    for key in ("top1", "top5", "loss", "train_loss", "best_top1"):
        assert resumed[key] == whole[key], key
    final = load_checkpoint(exp / "last.pt")["model"]
    assert final.keys() == weights.keys()
    for k, want in weights.items():
        if torch.is_tensor(want):
            torch.testing.assert_close(final[k], want, rtol=0, atol=0, msg=k)
        else:  # a module's extra state (quantizer settings)
            assert final[k] == want, k

"""A resumed run never silently starts over: unreadable or unfitting ``last.pt``, a checkpoint made
with other options, a started folder that lost its ``last.pt``, changed data; plus
:meth:`TrainConfig.differences` and the ``dgd`` distillation alias."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vitquant.errors import CheckpointError, ConfigError
from vitquant.train import TrainConfig, fit
from vitquant.train.checkpoint import load_checkpoint, save_checkpoint
from vitquant.train.data import build_train_data

TINY = dict(
    model="vit_nano_patch4_28",
    data_path="digits",
    epochs=1,
    batch_size=32,
    train_subset=64,
    eval_subset=32,
    warmup_epochs=0,
)


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step run."""
    exp = tmp_path_factory.mktemp("done") / "run"
    fit(TrainConfig(**TINY), exp_dir=exp, quiet=True)
    return exp


@pytest.fixture
def unfinished(done: Path, tmp_path: Path) -> Path:
    """A copy of ``done`` without ``result.json`` (resuming it would just evaluate and finish)."""
    exp = tmp_path / "run"
    shutil.copytree(done, exp)
    (exp / "result.json").unlink()
    return exp


def test_resume_of_unfinished_run_finishes_from_checkpoint(unfinished: Path, done: Path) -> None:
    res = fit(TrainConfig(**TINY), exp_dir=unfinished, quiet=True)
    ref = json.loads((done / "result.json").read_text())
    assert (res["top1"], res["best_top1"]) == (ref["top1"], ref["best_top1"])
    # nothing was trained again: the weights are those of the checkpoint
    a = load_checkpoint(unfinished / "last.pt")["model"]
    b = load_checkpoint(done / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lost_last_checkpoint_is_an_error(unfinished: Path) -> None:
    (unfinished / "last.pt").unlink()
    with pytest.raises(CheckpointError, match="started run .*best.pt.* no last.pt"):
        fit(TrainConfig(**TINY), exp_dir=unfinished, quiet=True)
    (unfinished / "best.pt").unlink()  # the log alone shows a started run too
    with pytest.raises(CheckpointError, match="log.jsonl"):
        fit(TrainConfig(**TINY), exp_dir=unfinished, quiet=True)


def test_checkpoint_options_are_checked_without_config_yaml(unfinished: Path) -> None:
    (unfinished / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"lr=0\.001 \(folder\) vs 0\.002 \(now\)"):
        fit(TrainConfig(**TINY, lr=2e-3), exp_dir=unfinished, quiet=True)
    with pytest.raises(ConfigError, match="method=float"):
        fit(TrainConfig(**TINY, method="lsq"), exp_dir=unfinished, quiet=True)


def test_unfitting_or_foreign_checkpoint(unfinished: Path) -> None:
    state = load_checkpoint(unfinished / "last.pt")
    state["model"].pop("head.bias")
    save_checkpoint(unfinished / "last.pt", state)
    with pytest.raises(
        CheckpointError, match="does not fit this run.s model: 1 missing .first: head.bias. keys"
    ):
        fit(TrainConfig(**TINY), exp_dir=unfinished, quiet=True)
    save_checkpoint(unfinished / "last.pt", {"model": {}})
    with pytest.raises(CheckpointError, match="not a vitquant training checkpoint"):
        fit(TrainConfig(**TINY), exp_dir=unfinished, quiet=True)
    (unfinished / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        fit(TrainConfig(**TINY), exp_dir=unfinished, quiet=True)


def test_changed_data_is_refused(unfinished: Path) -> None:
    cfg = TrainConfig(**TINY)
    data = build_train_data(cfg.replace(train_subset=96), 28)  # 3 steps per epoch, not 2
    with pytest.raises(ConfigError, match="2 steps per epoch .* has 3"):
        fit(cfg, exp_dir=unfinished, data=data, quiet=True)


def test_other_method_options_in_the_same_folder(tmp_path: Path) -> None:
    exp = tmp_path / "lsq"
    args = dict(TINY, method="lsq", train_subset=32, eval_subset=16)
    fit(TrainConfig(**args, method_args={"wbits": 4, "calib_batches": 1}), exp_dir=exp, quiet=True)
    (exp / "result.json").unlink()
    (exp / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"method_args\.wbits=4 \(folder\) vs 3 \(now\)"):
        fit(TrainConfig(**args, method_args={"wbits": 3, "calib_batches": 1}), exp_dir=exp)


def test_differences_fill_method_defaults() -> None:
    a = TrainConfig(method="lsq", method_args={"wbits": 4})
    full = TrainConfig(method="lsq", method_args={"wbits": 4, "init": "mse", "abits": None})
    assert a.differences(full) == []
    b = TrainConfig(method="lsq", method_args={"wbits": 4, "init": "max"}, lr=0.5)
    assert b.differences(a) == [
        "lr=0.5 (folder) vs 0.001 (now)",
        "method_args.init=max (folder) vs mse (now)",
    ]
    assert TrainConfig(num_workers=3).differences(TrainConfig()) == []  # runtime options


def test_dgd_alias_in_the_config() -> None:
    cfg = TrainConfig(method="qvit", distillation_type="dgd")
    assert cfg.distillation_type == "none" and cfg.method_args["dgd"] is True
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="dgd.*qvit.*'lsq'"):
        TrainConfig(method="lsq", distillation_type="dgd")
    with pytest.raises(ConfigError, match="no-dgd"):
        TrainConfig(method="qvit", method_args={"dgd": False}, distillation_type="dgd")

"""``vitquant train`` end to end in subprocesses: exact resume after a hard kill mid-epoch,
finished runs, refused resumes, corrupt checkpoints, and 2-process ``torchrun`` (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

#: a tiny, fast training run: 320 digits, 10 steps per epoch, 2 epochs, checkpoints every 3 steps
TINY = [
    "--model", "vit_nano_patch4_28", "--data-path", "digits", "--epochs", "2",
    "--batch-size", "32", "--train-subset", "320", "--eval-subset", "100", "--lr", "0.002",
    "--warmup-epochs", "0.5", "--save-every-steps", "3", "--quiet",
]  # fmt: skip


def env() -> dict[str, str]:
    """The environment of the subprocesses: the source tree, offline hubs, few threads."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Runs ``cmd`` in its own session; on timeout the whole process group is killed."""
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def vitquant(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m vitquant <argv>``."""
    return _run([sys.executable, "-m", "vitquant", *argv], timeout)


def torchrun(nproc: int, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m vitquant <argv>``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return _run([*launcher, "--nproc_per_node", str(nproc), "-m", "vitquant", *argv], timeout)


def _exp(out: Path) -> Path:
    dirs = [p.parent for p in out.rglob("config.yaml")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _weights(exp: Path) -> dict[str, torch.Tensor]:
    return torch.load(exp / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("ref")
    r = vitquant("train", *TINY, "--output", str(out))
    assert r.returncode == 0, r.stderr
    return _exp(out)


def test_killed_mid_epoch_resumes_exactly(reference: Path, tmp_path: Path) -> None:
    # killed hard (os._exit) after 7 steps: the last checkpoint is at step 6 of epoch 1
    r = vitquant("train", *TINY, "--output", str(tmp_path), "--_stop-after-steps", "7")
    assert r.returncode == 17, r.stderr
    exp = _exp(tmp_path)
    assert not (exp / "result.json").exists()
    state = torch.load(exp / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 6)
    # killed again in the second epoch (resumed at step 6: 5 more steps end at epoch 2 step 1)
    r = vitquant("train", *TINY, "--output", str(tmp_path), "--_stop-after-steps", "5")
    assert r.returncode == 17, r.stderr
    state = torch.load(exp / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)
    r = vitquant("train", *TINY, "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert exp.name == reference.name
    mine = json.loads((exp / "result.json").read_text())
    ref = json.loads((reference / "result.json").read_text())
    for key in ("top1", "top5", "loss", "train_loss", "best_top1"):
        assert mine[key] == ref[key], key
    a, b = _weights(exp), _weights(reference)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_just_reports(reference: Path) -> None:
    before = (reference / "last.pt").stat().st_mtime_ns
    r = vitquant("train", *TINY, "--output", str(reference.parents[2]))
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout
    assert (reference / "last.pt").stat().st_mtime_ns == before


def test_other_options_in_same_folder_are_refused(reference: Path) -> None:
    args = [*TINY, "--output", str(reference.parents[2]), "--name", reference.name]
    r = vitquant("train", *[a if a != "0.002" else "0.003" for a in args])
    assert r.returncode == 2
    assert r.stderr.startswith("error: experiment folder") and "lr=0.002 (folder)" in r.stderr
    assert r.stderr.count("\n") == 1


def test_corrupt_checkpoint_is_reported(tmp_path: Path) -> None:
    r = vitquant("train", *TINY, "--output", str(tmp_path), "--_stop-after-steps", "4")
    assert r.returncode == 17
    last = _exp(tmp_path) / "last.pt"
    last.write_bytes(last.read_bytes()[:300])
    r = vitquant("train", *TINY, "--output", str(tmp_path))
    assert r.returncode == 2 and "corrupt" in r.stderr and r.stderr.count("\n") == 1


def test_torchrun_two_processes_match_one(reference: Path, tmp_path: Path) -> None:
    # 2 x 16 images per step with interleaved shards = the same global batches as 1 x 32
    args = [a if a != "32" else "16" for a in TINY]
    r = torchrun(2, "train", *args, "--output", str(tmp_path), "--name", "ddp")
    assert r.returncode == 0, r.stderr[-2000:]
    exp = tmp_path / "vit_nano_patch4_28" / "digits" / "ddp"
    res = json.loads((exp / "result.json").read_text())
    ref = json.loads((reference / "result.json").read_text())
    assert res["top1"] == pytest.approx(ref["top1"], abs=1.01)  # at most one image of 100
    assert res["loss"] == pytest.approx(ref["loss"], rel=1e-3)
    a, b = _weights(exp), _weights(reference)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    files = sorted(p.name for p in exp.iterdir())
    assert files == ["best.pt", "config.yaml", "last.pt", "log.jsonl", "result.json"]

"""Atomic checkpoints, safe loading (no unpickling, corrupt files), RNG capture/restore."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from vitquant.errors import CheckpointError
from vitquant.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def test_roundtrip_and_no_temp_left(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "hist": [{"a": 1.5}], "n": None}
    save_checkpoint(tmp_path / "c.pt", state)
    save_checkpoint(tmp_path / "c.pt", {**state, "epoch": 4})
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["epoch"] == 4 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {"epoch": 1})

    class Boom:
        def __reduce__(self):  # noqa: ANN204
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(tmp_path / "c.pt", {"epoch": 2, "bad": Boom()})
    assert load_checkpoint(tmp_path / "c.pt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_and_pickled_files_raise(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(1000)})
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "torn.pt")
    torch.save({"obj": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="unpickl"):
        load_checkpoint(tmp_path / "pickled.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "raw.pkl")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_restores_all_generators(tmp_path: Path) -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    save_checkpoint(tmp_path / "r.pt", {"rng": capture_rng_state()})
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]

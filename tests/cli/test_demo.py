"""The demo's machinery on a tiny fake Fashion-MNIST folder: table, cache reuse, missing data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import vitquant.cli as cli
from vitquant.demo import DemoConfig, format_table, run_demo


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format (LeCun's MNIST files): magic (0, 0, 0x08 = uint8, ndim), big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    for prefix, n in (("train", 128), ("t10k", 64)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28)) + 150 * (labels[:, None, None] % 2)
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def test_demo_runs_and_reuses_the_float_model(fake_fashion: Path, tmp_path: Path) -> None:
    cfg = DemoConfig(
        data_path=str(fake_fashion),
        output=str(tmp_path / "runs"),
        quick=True,
        float_overrides={"model": "vit_nano_patch4_28", "epochs": 1, "batch_size": 32},
    )
    rows = run_demo(cfg)
    assert rows[0].name == "float32" and 0 <= rows[0].top1 <= 100 and rows[0].seconds
    names = [r.name for r in rows]
    assert "PTQ W8A8 ft1" in names and "PTQ W4A4 ViT-specific" in names
    int8 = rows[names.index("int8 runtime W8A8 ft1")]
    assert "x vs float32" in int8.note and 0 <= int8.top1 <= 100
    for r in rows[1:]:
        assert r.size_mb is not None and r.size_mb < rows[0].size_mb
    cfg.steps = ["float"]
    again = run_demo(cfg)
    assert again[0].top1 == rows[0].top1 and again[0].seconds is None
    assert "cached" in again[0].note
    table = format_table(again)
    assert "float32" in table and f"{rows[0].top1:.2f}" in table


def test_demo_without_data_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo", "--data-path", str(tmp_path / "none"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and err.count("\n") == 1

"""The whole demo (every row) on a tiny fake Fashion-MNIST and a tiny ViT: rows, result files,
the printed table, caching of the training runs, and the CLI."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import vitquant.cli as cli
from vitquant.demo import DEMO_STEPS, DemoConfig, DemoReport, DemoRow, format_table, run_demo_report
from vitquant.demo.ablation import ABLATION_ROWS
from vitquant.demo.report import markdown_table, plot_accuracy_vs_size, write_report
from vitquant.errors import ConfigError

EXPECTED_ROWS = [
    "float32",
    "PTQ W8A8 ft1",
    "PTQ W8A8 ft2",
    "PTQ W8A8 default",
    "PTQ W4A4 min-max",
    "PTQ W4A4 ViT-specific",
    "PTQ W4A4 lowbit",
    "QAT W4A4 LSQ",
    "Q-ViT W4A4",
    "VVTQ W4A4",
    "LSQ W2A2",
    "Q-ViT W2A2",
    "Q-ViT W2A2 no IRM",
    "Q-ViT W2A2 no DGD",
    "VVTQ W2A2",
    "VVTQ W2A2 no reg/freeze",
    "DiffQ λ=1",
    "DiffQ λ=10",
    "export (QAT W4A4 LSQ)",
    "int8 runtime W8A8 ft1",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (LeCun's MNIST format): magic 0, 0, 0x08 (uint8), ndim; big-endian dims; data."""
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + dims + array.astype(np.uint8).tobytes())


def make_fake_fashion(root: Path, n_train: int = 96, n_test: int = 48) -> Path:
    """Ten classes of noisy images whose brightness depends on the class (learnable)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28)) + 20 * labels[:, None, None]
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def tiny_config(tmp: Path, data: Path) -> DemoConfig:
    return DemoConfig(
        data_path=str(data),
        output=str(tmp / "runs"),
        out=str(tmp / "results"),
        quick=True,
        float_overrides={"model": "vit_nano_patch4_28", "epochs": 1, "batch_size": 32},
        finetune_overrides={"batch_size": 48},
        progress=False,
    )


def _exp_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("config.yaml"))


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("demo")
    cfg = tiny_config(tmp, make_fake_fashion(tmp / "fashion-mnist"))
    first = run_demo_report(cfg)
    written = write_report(first, cfg.results_dir())
    dirs = _exp_dirs(Path(cfg.output))
    second = run_demo_report(cfg)
    return {
        "cfg": cfg,
        "first": first,
        "second": second,
        "written": written,
        "dirs": dirs,
        "dirs_after": _exp_dirs(Path(cfg.output)),
    }


def test_every_row_is_present_with_finite_numbers(demo_runs: dict) -> None:
    rows: list[DemoRow] = demo_runs["first"].rows
    assert [r.name for r in rows] == EXPECTED_ROWS
    float_row = rows[0]
    assert float_row.bits == "32/32" and float_row.compression == 1.0
    for r in rows:
        assert math.isfinite(r.top1) and 0 <= r.top1 <= 100, r
        assert r.size_mb is not None and math.isfinite(r.size_mb) and r.size_mb > 0, r
        assert r.compression is not None and r.compression > 0, r
        # compression is float32 size over the row's size
        assert r.compression == pytest.approx(float_row.size_mb / r.size_mb)
        assert r.bits and "/" in r.bits, r
    for r in rows[1:]:
        assert r.size_mb < float_row.size_mb, r
    by = {r.name: r for r in rows}
    assert by["QAT W4A4 LSQ"].bits == "4/4" and by["PTQ W8A8 ft1"].bits == "8/8"
    assert by["DiffQ λ=1"].bits.endswith("/32") and by["DiffQ λ=1"].bits.startswith("~")
    speed = by["int8 runtime W8A8 ft1"].speedup
    assert speed is not None and math.isfinite(speed) and speed > 0
    assert all(r.speedup is None for r in rows if r.name != "int8 runtime W8A8 ft1")
    # the export reloads the LSQ model exactly: same accuracy, identical logits
    assert "reload identical" in by["export (QAT W4A4 LSQ)"].note
    assert by["export (QAT W4A4 LSQ)"].top1 == by["QAT W4A4 LSQ"].top1
    # W4 models are smaller than W8 ones
    assert by["QAT W4A4 LSQ"].size_mb < by["PTQ W8A8 ft1"].size_mb


def test_steps_are_timed_in_order(demo_runs: dict) -> None:
    report: DemoReport = demo_runs["first"]
    assert [n for n, _ in report.steps] == [n for n, _ in DEMO_STEPS]
    assert all(s >= 0 for _, s in report.steps)
    assert report.seconds >= sum(s for _, s in report.steps) - 1e-6


def test_json_matches_the_rows_and_the_printed_table(demo_runs: dict) -> None:
    report: DemoReport = demo_runs["first"]
    doc = json.loads(demo_runs["written"]["json"].read_text())
    assert doc["format"] == "vitquant-demo-results"
    assert doc["machine"]["cpu_count"] and doc["machine"]["torch"]
    assert doc["date"] and [s["name"] for s in doc["steps"]] == [n for n, _ in report.steps]
    assert doc["config"]["quick"] is True and doc["float_recipe"]["model"] == "vit_nano_patch4_28"
    table = format_table(report.rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(report.rows)
    ref = doc["rows"][0]["top1"]
    for row, line in zip(doc["rows"], lines[2:]):
        assert line.startswith(row["name"])
        cells = line.split()
        assert f"{row['top1']:.2f}" in cells and f"{row['size_mb']:.3f}" in cells
        if row["delta_top1"] is not None:
            assert row["delta_top1"] == pytest.approx(row["top1"] - ref, abs=1e-3)
            assert f"{row['top1'] - ref:+.2f}" in cells
    md = demo_runs["written"]["md"].read_text()
    assert markdown_table(report.rows) in md
    assert md.count("\n| ") == len(report.rows) + 1  # the header, then one line per row


def test_png_is_written(demo_runs: dict) -> None:
    png = demo_runs["written"]["png"]
    assert png.name == "accuracy_vs_size.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000


def test_second_run_reuses_every_training_run(demo_runs: dict) -> None:
    first: list[DemoRow] = demo_runs["first"].rows
    second: list[DemoRow] = demo_runs["second"].rows
    assert demo_runs["dirs"] == demo_runs["dirs_after"]  # no new experiment folder
    # float, 3 QAT methods at W4A4, 6 rows at W2A2, 2 DiffQ penalties
    assert len(demo_runs["dirs"]) == 12
    trained = {"float32", "QAT W4A4 LSQ", "Q-ViT W4A4", "VVTQ W4A4", "DiffQ λ=1", "DiffQ λ=10"}
    trained |= set(ABLATION_ROWS)
    for a, b in zip(first, second):
        assert a.name == b.name
        assert b.top1 == pytest.approx(a.top1) and b.size_mb == pytest.approx(a.size_mb)
        if a.name in trained:
            assert a.seconds is not None and b.seconds is None and "cached" in b.note


def test_cli_writes_the_files_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_fake_fashion(tmp_path / "fm", n_train=128, n_test=32)
    argv = ["demo", "--quick", "--data-path", str(data), "--output", str(tmp_path / "runs")]
    argv += ["--out", str(tmp_path / "res"), "--steps", "float", "ptq", "export"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/3] float ..." in out and "[3/3] export done in" in out
    doc = json.loads((tmp_path / "res" / "results.json").read_text())
    names = [r["name"] for r in doc["rows"]]
    # without the QAT rows the export falls back to the ViT-specific PTQ model
    assert names[-1] == "export (PTQ W4A4 ViT-specific)"
    for r in doc["rows"]:
        assert f"{r['top1']:.2f}" in out
    assert (tmp_path / "res" / "results.md").is_file()
    assert (tmp_path / "res" / "accuracy_vs_size.png").read_bytes()[:8] == PNG_MAGIC


def test_unknown_step_is_a_config_error(tmp_path: Path) -> None:
    data = make_fake_fashion(tmp_path / "fm", n_train=10, n_test=10)
    with pytest.raises(ConfigError, match="unknown demo step"):
        run_demo_report(DemoConfig(data_path=str(data), steps=["float", "nope"]))


def test_table_delta_and_missing_values() -> None:
    rows = [
        DemoRow("float32", 90.0, size_mb=4.0, bits="32/32", compression=1.0),
        DemoRow("x", 88.5, size_mb=0.5, bits="4/4", compression=8.0, speedup=2.0),
        DemoRow("y", 91.25, bits="8/8"),
    ]
    lines = format_table(rows).splitlines()
    assert "-1.50" in lines[3] and "8.0x" in lines[3] and "2.00x" in lines[3]
    assert "+1.25" in lines[4]
    assert "Δ" not in lines[2] and lines[2].split()[2] == "90.00"
    assert markdown_table(rows).count("\n") == len(rows) + 1


def test_plot_is_skipped_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rows = [DemoRow("float32", 90.0, size_mb=4.0, bits="32/32")]
    assert plot_accuracy_vs_size(rows, tmp_path / "p.png") is False
    assert not (tmp_path / "p.png").exists()


def test_large_model_speedup_times_both_models() -> None:
    from vitquant.demo.export import large_model_speedup

    speed = large_model_speedup("vit_nano_patch4_28", batch=2, repeats=2)
    assert speed["float_ms"] > 0 and speed["int8_ms"] > 0 and speed["speedup"] > 0
    # the int8 model stores its weights in a quarter of the bytes (plus scales)
    assert speed["int8_weight_bytes"] < 0.5 * speed["float_weight_bytes"]


def test_quick_results_do_not_overwrite_the_full_table() -> None:
    assert DemoConfig(output="r").results_dir() == Path("r")
    assert DemoConfig(output="r", quick=True).results_dir() == Path("r/quick")
    assert DemoConfig(output="r", out="x", quick=True).results_dir() == Path("x")


def test_two_bit_rows_report_oscillation(demo_runs: dict) -> None:
    by = {r.name: r for r in demo_runs["first"].rows}
    for name, (method, _, _) in ABLATION_ROWS.items():
        assert by[name].bits == "2/2" and 0 <= by[name].top1 <= 100, name
        assert ("codes flipped in the epoch" in by[name].note) == (method == "vvtq"), name

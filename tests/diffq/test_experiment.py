"""``vitquant.methods.diffq.run_diffq`` and ``scripts/diffq_sweep.py`` on a tiny float run (digits).

The folder a run lands in must be the one ``vitquant diffq run`` names, so the printed command
resumes or reports it; sizes are checked against a re-derivation from the checkpoint.
"""

from __future__ import annotations

import fnmatch
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import vitquant
from vitquant.cli import main
from vitquant.demo.diffq_experiment import method_values, run_diffq
from vitquant.errors import ConfigError
from vitquant.train.config import TrainConfig
from vitquant.train.experiment import Experiment

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "diffq_sweep.py"
TINY = dict(epochs=1, train_subset=128, eval_subset=64, lr=1e-4, quiet=True, device="cpu")


@pytest.fixture(scope="module")
def float_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished float run folder as ``vitquant train`` leaves it (config, result, best.pt),
    with untrained weights: the DiffQ runs only need the files."""
    out = tmp_path_factory.mktemp("float")
    cfg = TrainConfig(
        model="vit_nano_patch4_28",
        data_path="digits",
        epochs=1,
        eval_subset=64,
        batch_size=64,
        output=str(out),
    )
    exp = Experiment(out / "float")
    exp.write_config(cfg)
    model = vitquant.create_model("vit_nano_patch4_28", num_classes=10, in_chans=1)
    torch.save({"model": model.state_dict()}, exp.best_path)
    exp.write_result({"top1": 10.0, "top5": 50.0, "experiment": str(exp.root)})
    return exp.root


def test_method_values() -> None:
    assert method_values(3.0, 16) == {"penalty": 3.0, "group_size": 16, "bits_lr": 3e-2}
    assert method_values(bits=4) == {"bits": 4}
    with pytest.raises(ConfigError, match="not both"):
        method_values(1.0, bits=4)
    with pytest.raises(ConfigError, match="must be > 0"):
        method_values(0.0)


def test_not_a_float_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a finished training run"):
        run_diffq(tmp_path, 1.0, output=str(tmp_path / "o"), **TINY)


def _expected_uniform_mb(state: dict[str, torch.Tensor], bits: int, min_size: float) -> float:
    """DiffQ's UniformQuantizer size, re-derived: small tensors stay float32, others cost
    ``bits`` per weight plus a 64-bit range."""
    total = 0
    for name, v in state.items():
        if not v.is_floating_point() or fnmatch.fnmatch(name, "*_diffq"):
            continue
        if v.numel() <= min_size * 2**20 / 4:
            total += 32 * v.numel()
        else:
            total += bits * v.numel() + 64
    return total / 8 / 2**20


def test_qat_row_and_cli_resume(
    float_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    row = run_diffq(float_run, bits=4, output=str(out), **TINY)
    exp = Path(row["experiment"])
    assert exp == out / "vit_nano_patch4_28" / "digits" / "exp_bits=4"
    state = torch.load(exp / "last.pt", weights_only=True)["model"]
    float_mb = sum(v.numel() * 4 for v in state.values()) / 2**20
    assert row["float_size_mb"] == pytest.approx(float_mb)
    assert row["true_size_mb"] == pytest.approx(_expected_uniform_mb(state, 4, 0.01))
    assert row["compression"] == pytest.approx(float_mb / row["true_size_mb"])
    assert row["float_top1"] is None and row["delta_top1"] is None  # eval subset: not comparable
    # the printed command resumes the same folder: it reports the finished run, trains nothing
    argv = row["command"].split()
    assert argv[:3] == ["vitquant", "diffq", "run"]
    log = (exp / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(argv[1:]) == 0
    assert "finished already" in capsys.readouterr().out
    assert (exp / "log.jsonl").read_text() == log
    # vitquant eval works on the folder (truly quantized weights), as does diffq eval --act
    assert main(["eval", str(exp), "--subset", "64", "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == pytest.approx(row["top1"])
    assert main(["diffq", "eval", str(exp), "--act", "minmax_pc", "--act-samples", "1"]) == 0
    # a second call with other common options may not reuse the recipe
    with pytest.raises(ConfigError, match="other common options"):
        run_diffq(float_run, bits=4, output=str(out), **{**TINY, "lr": 5e-4})


def test_sweep_script_resumes(
    float_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sweep"
    png = tmp_path / "img" / "sweep.png"
    argv = [
        str(SCRIPT), "--float", str(float_run), "--penalties", "1", "30", "--group-size", "4",
        "--qat-bits", "--epochs", "1", "--train-subset", "128", "--eval-subset", "64",
        "--out", str(out), "--png", str(png), "--device", "cpu", "--quiet",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    data = json.loads((out / "sweep.json").read_text())
    rows = data["rows"]
    assert [r["penalty"] for r in rows] == [1.0, 30.0]
    for r in rows:
        assert (
            Path(r["experiment"]).name == f"exp_bits_lr=0.03,group_size=4,penalty={r['penalty']:g}"
        )
        log = [
            json.loads(x)
            for x in (Path(r["experiment"]) / "log.jsonl").read_text().split("\n")
            if x
        ]
        assert r["true_size_mb"] == log[-1]["model_size_mb"]
        assert r["bits_per_weight"] == log[-1]["bits_per_weight"]
        assert r["compression"] == pytest.approx(log[-1]["float_size_mb"] / r["true_size_mb"])
    # a larger penalty never makes the model larger
    assert rows[1]["true_size_mb"] <= rows[0]["true_size_mb"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "sweep.md").read_text()
    assert "| float32 |" in table and "vitquant diffq run -p 30 -g 4 --bits-lr 0.03" in table
    # rerun: every run is found finished, nothing retrains
    mtimes = {r["experiment"]: (Path(r["experiment"]) / "last.pt").stat().st_mtime_ns for r in rows}
    runpy.run_path(str(SCRIPT), run_name="__main__")
    for exp, t in mtimes.items():
        assert (Path(exp) / "last.pt").stat().st_mtime_ns == t

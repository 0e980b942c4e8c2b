"""``vitquant eval`` and the one-line errors of bad input to ``train``/``eval`` (in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vitquant.cli as cli
from vitquant import create_model
from vitquant.train import TrainConfig, fit

TINY = dict(
    model="vit_nano_patch4_28",
    data_path="digits",
    epochs=1,
    batch_size=32,
    train_subset=160,
    eval_subset=100,
    lr=0.002,
    warmup_epochs=0.5,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    fit(TrainConfig(**TINY, output=str(out)), exp_dir=out / "run", quiet=True)
    return out / "run"


def _one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_eval_run_dir_matches_training_metrics(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["eval", str(run_dir), "--which", "last"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out
    ev = json.loads((run_dir / "eval.json").read_text())
    res = json.loads((run_dir / "result.json").read_text())
    assert ev["top1"] == res["top1"] and ev["loss"] == pytest.approx(res["loss"], rel=1e-6)
    assert ev["images"] == 100


def test_eval_model_and_checkpoint(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "e.json"
    argv = ["eval", "--model", "vit_nano_patch4_28", "--checkpoint", str(run_dir / "last.pt")]
    argv += ["--data-path", "digits", "--subset", "100", "--output", str(out)]
    assert cli.main(argv) == 0
    res = json.loads((run_dir / "result.json").read_text())
    assert json.loads(out.read_text())["top1"] == res["top1"]


def test_eval_bad_inputs(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.pt"
    torch.save({"model": create_model("vit_micro_patch7_28").state_dict()}, other)
    err = _one_line_error(
        capsys, "eval", "--model", "vit_nano_patch4_28", "--checkpoint", str(other),
        "--data-path", "digits",
    )  # fmt: skip
    assert "does not fit" in err
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": create_model("vit_nano_patch4_28").state_dict(), "p": Path("x")}, pickled)
    err = _one_line_error(
        capsys, "eval", "--model", "vit_nano_patch4_28", "--checkpoint", str(pickled),
        "--data-path", "digits",
    )  # fmt: skip
    assert "unpickl" in err or "pickle" in err
    _one_line_error(capsys, "eval", str(tmp_path))  # not a run folder
    _one_line_error(capsys, "eval", str(tmp_path / "missing"))
    _one_line_error(capsys, "eval", str(run_dir), "--data-path", str(tmp_path / "nodata"))
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, "eval", str(run_dir), "--data-path", str(tmp_path / "empty"))


def test_train_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "--model", "vit_nano_patch4_28", "--output", str(tmp_path), "--epochs", "1"]
    base += ["--batch-size", "32"]
    err = _one_line_error(capsys, *base, "--data-path", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, *base, "--data-path", str(tmp_path / "empty"))
    other = tmp_path / "other.pt"
    torch.save({"model": create_model("vit_micro_patch7_28").state_dict()}, other)
    err = _one_line_error(
        capsys, *base, "--data-path", "digits", "--train-subset", "64", "--finetune", str(other)
    )
    assert "does not fit" in err or "not vit_nano_patch4_28" in err
    err = _one_line_error(capsys, *base, "--data-path", "digits", "--method", "no-such-method")
    assert "unknown training method" in err
    err = _one_line_error(capsys, *base, "--data-path", "digits", "--distillation-type", "hard")
    assert "teacher" in err
    # a teacher predicting another number of classes
    t = tmp_path / "teacher.pt"
    torch.save({"model": create_model("vit_nano_patch4_28", num_classes=7).state_dict()}, t)
    err = _one_line_error(
        capsys, *base, "--data-path", "digits", "--train-subset", "64", "--teacher", str(t),
        "--teacher-model", "vit_nano_patch4_28", "--distillation-type", "soft",
    )  # fmt: skip
    assert "7 classes" in err
    assert not list(tmp_path.rglob("config.yaml"))  # no experiment folder left behind


def test_finetune_from_a_run_and_teacher_from_a_run(run_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        **{**TINY, "train_subset": 64},
        finetune=str(run_dir),
        teacher=str(run_dir),
        distillation_type="hard",
    )
    res = fit(cfg, exp_dir=tmp_path / "ft", quiet=True)
    assert res["top1"] is not None and (tmp_path / "ft" / "result.json").exists()


def test_eval_quantized_and_int8(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quant = pytest.importorskip("vitquant.quant")
    if not hasattr(quant, "save_calibrated"):
        pytest.skip("vitquant.quant.save_calibrated is not available")
    from vitquant.train.checkpoint import load_checkpoint

    model = create_model("vit_nano_patch4_28", num_classes=10, in_chans=1)
    model.load_state_dict(load_checkpoint(run_dir / "last.pt")["model"])
    quant.prepare(model, quant.QuantConfig("ft2"))
    quant.calibrate(model, [torch.randn(8, 1, 28, 28) for _ in range(2)], progress=False)
    path = quant.save_calibrated(
        model, tmp_path / "calib.pth", model_name="vit_nano_patch4_28",
        model_kwargs={"num_classes": 10, "in_chans": 1},
    )  # fmt: skip
    out = tmp_path / "q.json"
    argv = ["eval", "--quantized", str(path), "--data-path", "digits", "--subset", "64"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    q = json.loads(out.read_text())
    assert q["images"] == 64 and 0 <= q["top1"] <= 100
    assert cli.main([*argv, "--int8", "--output", str(out)]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["int8"] is True


# --- a checkpoint's head and the class count (see tests/models/test_head_classes.py) ---------
def _seven_classes(tmp_path: Path) -> Path:
    """Float weights of a 7-class ``vit_nano_patch4_28`` (the digits data has 10 classes)."""
    torch.manual_seed(7)
    path = tmp_path / "seven.pth"
    torch.save(create_model("vit_nano_patch4_28", num_classes=7).state_dict(), path)
    return path


def test_calibrate_refuses_a_head_of_other_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(_seven_classes(tmp_path))
    argv = ["calibrate", "--model", "vit_nano_patch4_28", "--pretrained", path]
    argv += ["--data-path", "digits", "--calib-output-path", str(tmp_path), "--device", "cpu"]
    err = _one_line_error(capsys, *argv)
    assert path in err and "7 classes" in err and "has 10" in err
    err = _one_line_error(capsys, *argv, "--num-classes", "10")
    assert "7 classes" in err and "10" in err
    assert not list(tmp_path.glob("*_calib.*"))  # nothing was written


def test_eval_refuses_pretrained_weights_of_other_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VITQUANT_HOME", str(tmp_path))
    _seven_classes(tmp_path).rename(tmp_path / "vit_nano_patch4_28.pth")
    argv = ["eval", "--model", "vit_nano_patch4_28", "--pretrained", "--data-path", "digits"]
    err = _one_line_error(capsys, *argv, "--subset", "32", "--output", str(tmp_path / "e.json"))
    assert "7 classes" in err and "10" in err


def test_export_takes_the_class_count_of_the_checkpoint(tmp_path: Path) -> None:
    from vitquant.export.io import load_quantized

    path = _seven_classes(tmp_path)
    out = tmp_path / "w8.safetensors"
    argv = ["export", "--model", "vit_nano_patch4_28", "--pretrained", str(path)]
    assert cli.main([*argv, "--output", str(out)]) == 0
    model = load_quantized(out)
    assert model.num_classes == 7
    src = create_model("vit_nano_patch4_28", num_classes=7)
    src.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(model.head.weight, src.head.weight)  # the head is not quantized

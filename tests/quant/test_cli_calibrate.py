"""`vitquant calibrate` end to end on the built-in digits data (tiny), and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitquant.cli import main
from vitquant.quant import load_calibrated, quant_summary


def test_calibrate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "calibrate",
            "--model", "vit_nano_patch4_28",
            "--data-path", "digits",
            "--img-size", "28",
            "--num-calib-batch", "2",
            "--calib-batchsz", "4",
            "--batch-size", "32",
            "--max-eval-batches", "1",
            "--quant-mode", "2",
            "--calibrator", "percentile",
            "--percentile", "99.9",
            "--calib-output-path", str(tmp_path),
            "--device", "cpu",
            "--no-progress",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "float" in out and "quantized" in out and "blocks.0.attn.qkv.weight_quantizer" in out
    result = json.loads((tmp_path / "vit_nano_patch4_28_calib.json").read_text())
    assert result["config"]["preset"] == "ft2" and result["calib_images"] == 8
    model = load_calibrated(tmp_path / "vit_nano_patch4_28_calib.pth")
    rows = quant_summary(model)
    assert len(rows) == 34 and all(r["calibrated"] for r in rows)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_calibrate_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["calibrate", "--model", "vit_nano_patch4_28", "--quant-mode", "ft7"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown preset" in err and len(err.strip().splitlines()) == 1
    rc = main(["calibrate", "--model", "vit_nano_patch4_28", "--wbits", "1"])
    assert rc == 2 and "wbits" in capsys.readouterr().err


def test_calibrate_cli_default_is_robust_with_fallback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "calibrate",
            "--model", "vit_nano_patch4_28",
            "--data-path", "digits",
            "--img-size", "28",
            "--num-calib-batch", "2",
            "--calib-batchsz", "8",
            "--batch-size", "64",
            "--max-eval-batches", "2",
            "--wbits", "4", "--abits", "4",
            "--target-agreement", "100",
            "--fallback-bits", "float",
            "--fallback-images", "64",
            "--calib-output-path", str(tmp_path),
            "--device", "cpu",
            "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "vit_nano_patch4_28_calib.json").read_text())
    assert result["config"]["preset"] == "robust"
    fb = result["fallback"]
    assert fb["layers"], "a 100% agreement target at W4A4 keeps some layer in float"
    # what the report says was kept in float is float in the saved model
    model = load_calibrated(tmp_path / "vit_nano_patch4_28_calib.pth")
    kept = {layer["name"] for layer in fb["layers"]}
    for name in kept:
        m = model.get_submodule(name)
        assert not any(q.enabled for q in m.modules() if hasattr(q, "enabled") and q is not m)


def test_calibrate_cli_smooth_alpha_errors(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["calibrate", "--model", "vit_nano_patch4_28", "--smooth-alpha", "lots"])
    assert rc == 2 and "smooth-alpha" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["0", "100"])
def test_calibrate_cli_lowbit_with_a_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    """lowbit + a budget: a reconstructed model that meets it keeps every layer low (target 0);
    otherwise the fallback runs first and reconstruction after it (target 100: layers kept)."""
    rc = main(
        [
            "calibrate",
            "--model", "vit_nano_patch4_28",
            "--data-path", "digits",
            "--img-size", "28",
            "--num-calib-batch", "2",
            "--calib-batchsz", "16",
            "--batch-size", "64",
            "--max-eval-batches", "1",
            "--quant-mode", "lowbit", "--wbits", "4", "--abits", "4",
            "--reconstruct-iters", "20",
            "--target-agreement", target,
            "--fallback-images", "64",
            "--calib-output-path", str(tmp_path),
            "--device", "cpu",
            "--no-progress",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads((tmp_path / "vit_nano_patch4_28_calib.json").read_text())
    assert result["config"]["preset"] == "lowbit"
    if target == "0":
        assert "no fallback needed" in out and "fallback" not in result
    else:
        assert result["fallback"]["layers"]
        model = load_calibrated(tmp_path / "vit_nano_patch4_28_calib.pth")
        kept = {layer["name"] for layer in result["fallback"]["layers"]}
        bits = {n.rpartition(".")[0]: q.bits for n, q in model.named_modules()
                if hasattr(q, "bits") and n.endswith("weight_quantizer")}  # fmt: skip
        assert all(bits[name] == 8 for name in kept if name in bits)
        assert any(b == 4 for b in bits.values())


def test_calibrate_cli_reconstruct_loss(tmp_path: Path) -> None:
    """--reconstruct-loss fisher reaches the reconstruct pass (and adds it to the passes)."""
    rc = main(
        [
            "calibrate",
            "--model", "vit_nano_patch4_28",
            "--data-path", "digits",
            "--img-size", "28",
            "--num-calib-batch", "1",
            "--calib-batchsz", "16",
            "--batch-size", "64",
            "--max-eval-batches", "1",
            "--wbits", "4", "--abits", "4",
            "--reconstruct-iters", "5",
            "--reconstruct-loss", "fisher",
            "--calib-output-path", str(tmp_path),
            "--device", "cpu",
            "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    config = json.loads((tmp_path / "vit_nano_patch4_28_calib.json").read_text())["config"]
    assert "reconstruct" in config["passes"]
    assert config["pass_options"]["reconstruct"]["loss"] == "fisher"


def test_calibrate_cli_act_dynamic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "calibrate",
            "--model", "vit_nano_patch4_28",
            "--data-path", "digits",
            "--img-size", "28",
            "--num-calib-batch", "1",
            "--calib-batchsz", "4",
            "--max-eval-batches", "1",
            "--quant-mode", "ft1",
            "--act-dynamic",
            "--calib-output-path", str(tmp_path),
            "--device", "cpu",
            "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "vit_nano_patch4_28_calib.json").read_text())
    assert result["config"]["act_dynamic"] is True
    model = load_calibrated(tmp_path / "vit_nano_patch4_28_calib.pth")
    rows = {r["name"]: r for r in quant_summary(model)}
    assert "dynamic" in str(rows["blocks.0.mlp.fc2.input_quantizer"])

"""save_calibrated / load_calibrated: plain-data files, identical logits in a fresh process,
clear errors for files that do not match."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitquant
from vitquant.errors import CheckpointError
from vitquant.quant import (
    QuantConfig,
    calibrate,
    load_calibrated,
    prepare,
    quant_summary,
    save_calibrated,
)

KW = {"num_classes": 7}


def _calibrated(preset: str = "repq") -> torch.nn.Module:
    model = vitquant.create_model("vit_nano_patch4_28", **KW).eval()
    prepare(model, QuantConfig(preset, wbits=6, abits=6))
    calibrate(model, [torch.randn(4, 1, 28, 28) for _ in range(2)], progress=False)
    return model


@pytest.mark.parametrize("preset", ["ft1", "repq"])
def test_round_trip_same_logits(tmp_path: Path, preset: str) -> None:
    model = _calibrated(preset)
    path = save_calibrated(
        model, tmp_path / "m_calib.pth", model_name="vit_nano_patch4_28", model_kwargs=KW
    )
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["model_name"] == "vit_nano_patch4_28" and raw["config"]["preset"] == preset
    back = load_calibrated(path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(back(x), model(x))
    assert [r["range"] for r in quant_summary(back)] == [r["range"] for r in quant_summary(model)]
    assert not list(tmp_path.glob("*.tmp"))


def test_fresh_process_identical_logits(tmp_path: Path) -> None:
    model = _calibrated()
    save_calibrated(model, tmp_path / "m.pth", model_name="vit_nano_patch4_28", model_kwargs=KW)
    x = torch.randn(2, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "ref.pt")
    code = (
        "import torch, sys; from vitquant.quant import load_calibrated; "
        f"m = load_calibrated(r'{tmp_path / 'm.pth'}'); "
        f"x = torch.load(r'{tmp_path / 'x.pt'}', weights_only=True); "
        f"ref = torch.load(r'{tmp_path / 'ref.pt'}', weights_only=True); "
        "sys.exit(0 if torch.equal(m(x), ref) else 3)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(vitquant.__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_mismatch_errors(tmp_path: Path) -> None:
    model = _calibrated("ft1")
    path = save_calibrated(
        model, tmp_path / "m.pth", model_name="vit_nano_patch4_28", model_kwargs=KW
    )
    raw = torch.load(path, weights_only=True)
    raw["model_kwargs"] = {"num_classes": 5}
    torch.save(raw, tmp_path / "other_head.pth")
    with pytest.raises(CheckpointError, match=r"head\.weight.*\(7, 32\).*\(5, 32\)"):
        load_calibrated(tmp_path / "other_head.pth")
    raw["model_kwargs"] = KW
    raw["config"]["preset"] = "ft2"
    torch.save(raw, tmp_path / "other_preset.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_calibrated(tmp_path / "other_preset.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_calibrated(tmp_path / "junk.pth")
    torch.save({"state_dict": {}}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="not a vitquant calibrated"):
        load_calibrated(tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_calibrated(tmp_path / "missing.pth")


def test_a_layer_kept_in_float_stays_float(tmp_path: Path) -> None:
    model = _calibrated("ft1")
    fc2 = model.blocks[0].mlp.fc2
    fc2.input_quantizer.enabled = False
    fc2.weight_quantizer.enabled = False
    path = save_calibrated(
        model, tmp_path / "m_calib.pth", model_name="vit_nano_patch4_28", model_kwargs=KW
    )
    loaded = load_calibrated(path).eval()
    lf = loaded.blocks[0].mlp.fc2
    assert not lf.input_quantizer.enabled and not lf.weight_quantizer.enabled
    assert loaded.blocks[0].mlp.fc1.input_quantizer.enabled
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_a_smoothed_model_round_trips(tmp_path: Path) -> None:
    model = vitquant.create_model("vit_nano_patch4_28", **KW).eval()
    prepare(
        model,
        QuantConfig(
            "ft1",
            wbits=8,
            abits=8,
            passes=["smooth"],
            pass_options={"smooth": {"alpha": 0.5, "progress": False}},
        ),
    )
    calibrate(model, [torch.randn(4, 1, 28, 28) for _ in range(2)], progress=False)
    assert model.blocks[0].mlp.fc2.smooth_scale is not None
    path = save_calibrated(
        model, tmp_path / "m_calib.pth", model_name="vit_nano_patch4_28", model_kwargs=KW
    )
    loaded = load_calibrated(path).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))

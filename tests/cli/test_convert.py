"""``vitquant convert``: .pth -> safetensors, and the refusal of pickled objects."""

from __future__ import annotations

import collections
from pathlib import Path

import torch
from safetensors.torch import load_file

import vitquant
from vitquant.cli import main


def test_convert_roundtrip(tmp_path: Path, capsys) -> None:
    model = vitquant.create_model("vit_nano_patch4_28")
    src = tmp_path / "m.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, src)
    assert main(["convert", str(src), str(tmp_path / "m.safetensors")]) == 0
    loaded = load_file(tmp_path / "m.safetensors")
    assert loaded.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)


def test_convert_refuses_pickled_objects(tmp_path: Path, capsys) -> None:
    src = tmp_path / "odd.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": collections.OrderedDict, "f": len}, src)
    assert main(["convert", str(src), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert not (tmp_path / "o.safetensors").exists()

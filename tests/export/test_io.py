"""Packed exports: round trips, sizes, fresh-process loading, and a fuzzed loader."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import vitquant
from helpers import has_layer_scale, randomize_affine
from vitquant.errors import CheckpointError, ConfigError
from vitquant.export.io import (
    load_quantized,
    model_size_report,
    read_header,
    save_quantized,
    size_report,
)
from vitquant.quant import QuantConfig, calibrate, prepare


def _model(wbits: int, preset: str = "ft1", name: str = "vit_nano_patch4_28", **kw) -> nn.Module:
    """A calibrated model with LayerScale and random biases, LayerNorms and gammas, so that an
    export losing any of them changes the logits."""
    torch.manual_seed(0)
    kw.setdefault("init_values", 0.5)
    m = vitquant.create_model(name, num_classes=10, **kw).eval()
    randomize_affine(m)
    prepare(m, QuantConfig(preset=preset, wbits=wbits))
    calibrate(m, [torch.randn(8, 1, 28, 28)], method="max", progress=False)
    return m


@pytest.fixture(scope="module")
def w4_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    m = _model(4)
    path = save_quantized(m, tmp_path_factory.mktemp("exp") / "w4.safetensors")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        return path, x, m(x)


@pytest.mark.parametrize("wbits,preset", [(4, "ft1"), (8, "ft2"), (3, "weight_only")])
def test_round_trip_identical_logits(tmp_path: Path, wbits: int, preset: str) -> None:
    m = _model(wbits, preset)
    assert has_layer_scale(m)
    path = save_quantized(m, tmp_path / "m.safetensors")
    loaded = load_quantized(path)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    assert not loaded.training
    header = read_header(path)
    packed = [r for r in header["tensors"].values() if r["storage"] == "packed"]
    assert packed and all(r["bits"] == wbits for r in packed)


def test_packed_weights_are_the_quantized_integers(tmp_path: Path) -> None:
    """The stored bytes decode (independently, with numpy) to round(w / s) per channel."""
    import numpy as np
    from safetensors.numpy import load_file

    m = _model(4)
    path = save_quantized(m, tmp_path / "m.safetensors")
    arrays = load_file(str(path))
    lin = m.blocks[0].mlp.fc1
    s = lin.weight_quantizer.scale.reshape(-1, 1)
    expect = torch.clamp(torch.round(lin.weight.detach() / s), -8, 7).numpy().astype(np.int64)
    raw = arrays["blocks.0.mlp.fc1.weight::codes"]
    bits = np.unpackbits(raw, bitorder="little")[: expect.size * 4].reshape(-1, 4)
    values = (bits * (1 << np.arange(4))).sum(1) - 8
    assert np.array_equal(values.reshape(expect.shape), expect)


def test_fresh_process_gives_identical_logits(
    w4_file: tuple[Path, torch.Tensor, torch.Tensor],
) -> None:
    path, x, ref = w4_file
    ref_path = path.with_suffix(".ref.pt")
    torch.save({"x": x, "ref": ref}, ref_path)
    code = (
        "import sys, torch\n"
        "from vitquant.export.io import load_quantized\n"
        f"d = torch.load({str(ref_path)!r}, weights_only=True)\n"
        f"m = load_quantized({str(path)!r})\n"
        "with torch.no_grad(): y = m(d['x'])\n"
        "sys.exit(0 if torch.equal(y, d['ref']) else 1)\n"
    )
    src = str(Path(vitquant.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("wbits", [4, 8])
def test_file_within_two_percent_of_true_size(tmp_path: Path, wbits: int) -> None:
    torch.manual_seed(0)
    m = vitquant.create_model("vit_small_patch16_224", depth=2, num_classes=10).eval()
    prepare(m, QuantConfig(preset="weight_only", wbits=wbits))
    calibrate(m, [torch.zeros(1, 3, 224, 224)], method="max", progress=False)
    path = save_quantized(m, tmp_path / "m.safetensors")
    rep = size_report(path)
    # independent true size: packed linear weights at wbits, every other tensor as stored
    true = 0
    for key, t in m.state_dict().items():
        if not torch.is_tensor(t):
            continue
        packed = key.endswith("weight") and key.replace(".weight", ".weight_quantizer.scale") in (
            m.state_dict()
        )
        true += (t.numel() * wbits + 7) // 8 if packed else t.numel() * t.element_size()
    assert rep["quantized_bytes"] == true
    assert abs(rep["file_bytes"] / true - 1) < 0.02
    assert rep["compression"] == pytest.approx(rep["float32_bytes"] / true)
    assert model_size_report(m)["quantized_bytes"] == true
    names = [n for n, _ in rep["float_tensors"]]
    assert "pos_embed" in names and "blocks.0.attn.qkv.bias" in names
    assert "blocks.0.attn.qkv.weight" not in names


def test_load_quantized_can_lower(w4_file: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    path, x, ref = w4_file
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = load_quantized(path, lower=True)
    with torch.no_grad():
        y = low(x)
    assert float((y - ref).abs().max() / ref.abs().max()) < 0.1


# --- bad input ----------------------------------------------------------------------------------
def _rewrite_header(src: Path, dst: Path, change) -> None:
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    st_header = json.loads(data[8 : 8 + n])
    meta = st_header["__metadata__"]
    header = json.loads(meta["header"])
    change(header)
    meta["header"] = json.dumps(header)
    new = json.dumps(st_header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    dst.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


def test_other_format_version_refused(w4_file, tmp_path: Path) -> None:
    path = w4_file[0]
    bad = tmp_path / "v2.safetensors"
    _rewrite_header(path, bad, lambda h: h.update(format_version=2))
    with pytest.raises(CheckpointError, match="format version 2"):
        load_quantized(bad)


def test_edited_header_fails_checksum(w4_file, tmp_path: Path) -> None:
    bad = tmp_path / "edit.safetensors"
    _rewrite_header(
        w4_file[0], bad, lambda h: h["tensors"]["blocks.0.mlp.fc1.weight"].update(qmin=-7)
    )
    with pytest.raises(CheckpointError, match="checksum"):
        load_quantized(bad)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_quantized(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a vitquant"):
        load_quantized(tmp_path / "plain.safetensors")


def test_save_refuses_uncalibrated_and_unprepared(tmp_path: Path) -> None:
    m = vitquant.create_model("vit_nano_patch4_28", num_classes=10)
    with pytest.raises(ConfigError, match="prepared"):
        save_quantized(m, tmp_path / "a.safetensors")
    prepare(m, QuantConfig(preset="ft1"))
    with pytest.raises(ConfigError, match="never calibrated"):
        save_quantized(m, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_truncated_or_bit_flipped_files(w4_file, tmp_path: Path, data: st.DataObject) -> None:
    path, x, ref = w4_file
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 3), label="flips")):
            pos = data.draw(st.integers(0, len(raw) - 1), label="byte")
            raw[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    bad = tmp_path / "fuzz.safetensors"
    bad.write_bytes(bytes(raw))
    try:
        model = load_quantized(bad)
    except CheckpointError:
        return
    # a flip that changes nothing meaningful (JSON whitespace) must give the same model
    with torch.no_grad():
        assert torch.equal(model(x), ref)


# --- CLI -----------------------------------------------------------------------------------------
def test_cli_export_and_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitquant.cli import main

    out = tmp_path / "w4.safetensors"
    assert main(["export", "--model", "vit_nano_patch4_28", "--wbits", "4", "-o", str(out)]) == 0
    header = read_header(out)
    assert {r["bits"] for r in header["tensors"].values() if r["storage"] == "packed"} == {4}
    capsys.readouterr()
    assert main(["size", str(out)]) == 0
    text = capsys.readouterr().out
    rep = size_report(out)
    assert f"{rep['file_bytes']:,} B" in text and "left in float" in text and "pos_embed" in text
    assert main(["size", "vit_nano_patch4_28", "--wbits", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantized_bytes"] == rep["quantized_bytes"]


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitquant.cli import main

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["size", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert main(["export", "-o", str(tmp_path / "x.safetensors")]) == 2

"""Packed exports of models whose linears carry SmoothQuant factors (``smooth_scale``): the
factors travel with the export, the reloaded model computes the same logits, and the sizes do
not count them as part of the float model."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import vitquant
from helpers import randomize_affine
from vitquant.export.io import load_quantized, model_size_report, save_quantized, size_report
from vitquant.quant import QuantConfig, calibrate, prepare, quantization_disabled


def _models() -> tuple[nn.Module, nn.Module]:
    """``(plain, smoothed)``: one random prepared model calibrated as it is and after giving
    every ``fc2`` and ``proj`` random factors (weight columns scaled to keep the function)."""
    torch.manual_seed(0)
    m = vitquant.create_model("vit_nano_patch4_28", num_classes=10, init_values=0.5).eval()
    randomize_affine(m)
    prepare(m, QuantConfig(preset="ft1", wbits=4))
    smoothed = copy.deepcopy(m)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in smoothed.blocks:
            for lin in (block.mlp.fc2, block.attn.proj):
                s = torch.exp(torch.empty(lin.in_features).uniform_(-1.5, 1.5, generator=gen))
                lin.weight.mul_(s)
                lin.smooth_scale = s
    data = [torch.randn(8, 1, 28, 28)]
    for model in (m, smoothed):
        calibrate(model, data, method="max", progress=False)
    return m, smoothed


def test_smoothed_round_trip_identical_logits(tmp_path: Path) -> None:
    plain, smoothed = _models()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad(), quantization_disabled(smoothed), quantization_disabled(plain):
        assert float((smoothed(x) - plain(x)).norm() / plain(x).norm()) < 1e-5
    path = save_quantized(smoothed, tmp_path / "s.safetensors")
    loaded = load_quantized(path)
    key = "blocks.1.mlp.fc2.smooth_scale"
    assert torch.equal(loaded.state_dict()[key], smoothed.state_dict()[key])
    with torch.no_grad():
        assert torch.equal(loaded(x), smoothed(x))
    lowered = load_quantized(path, lower=True)
    with torch.no_grad():
        y, ref = lowered(x), smoothed(x)
    assert float(torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)) > 0.99


def test_smoothing_factors_are_not_float_model_size(tmp_path: Path) -> None:
    plain, smoothed = _models()
    a, b = model_size_report(plain), model_size_report(smoothed)
    assert b["float32_bytes"] == a["float32_bytes"]
    assert not any(name.endswith("smooth_scale") for name, _ in b["float_tensors"])
    n = sum(m.in_features for blk in smoothed.blocks for m in (blk.mlp.fc2, blk.attn.proj))
    assert b["quantized_bytes"] == a["quantized_bytes"] + 4 * n  # stored, as float32
    path = save_quantized(smoothed, tmp_path / "s.safetensors")
    assert size_report(path)["float32_bytes"] == a["float32_bytes"]

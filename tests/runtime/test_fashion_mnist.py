"""Acceptance: a lowered model agrees with its fake-quant model on Fashion-MNIST test images."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitquant
from vitquant.quant import QuantConfig, calibrate, prepare
from vitquant.runtime import lower

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from vitquant.data.idx import read_idx

    prefix = "train" if split == "train" else "t10k"
    x = torch.from_numpy(read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz").copy()).float()
    y = torch.from_numpy(read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
    return ((x / 255.0 - 0.286) / 0.353).unsqueeze(1), y


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A nano ViT trained for a few seconds (~55% accuracy, far above chance) and the data."""
    torch.manual_seed(0)
    xtr, ytr = _load("train")
    xte, yte = _load("test")
    model = vitquant.create_model("vit_nano_patch4_28", num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(150):
        idx = torch.randint(0, len(xtr), (128,))
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), (xtr, ytr, xte, yte)


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize(
    "preset,method,float_dtype",
    [
        ("ft1", "percentile", torch.float32),
        ("ft2", "max", torch.float32),
        ("ft1", "percentile", torch.bfloat16),
    ],
)
def test_int8_top1_agrees_with_fake_quant(
    trained, preset: str, method: str, float_dtype: torch.dtype
) -> None:
    """Lowered top-1 within 0.1 pt of the fake-quant model's (issue 18), bfloat16 stream too."""
    model, (xtr, _, xte, yte) = copy.deepcopy(trained[0]), trained[1]
    prepare(model, QuantConfig(preset=preset))
    calibrate(model, [xtr[i : i + 128] for i in range(0, 512, 128)], method, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = lower(copy.deepcopy(model), float_dtype=float_dtype)
    with torch.no_grad():
        fq = torch.cat([model(xte[i : i + 1000]) for i in range(0, len(xte), 1000)])
        i8 = torch.cat([low(xte[i : i + 1000]) for i in range(0, len(xte), 1000)])
    acc = (fq.argmax(1) == yte).float().mean().item()
    acc8 = (i8.argmax(1) == yte).float().mean().item()
    agree = (fq.argmax(1) == i8.argmax(1)).float().mean().item()
    rel = ((i8 - fq).abs().max() / fq.abs().max()).item()
    print(
        f"{preset} {float_dtype}: accuracy {acc:.4f} (int8 {acc8:.4f}), top-1 agreement "
        f"{agree:.4f}, max rel logit diff {rel:.4f}"
    )
    assert acc > 0.45, acc
    assert abs(acc8 - acc) <= 0.001, (acc8, acc)
    assert agree >= 0.99, agree
    assert rel < 0.05, rel

"""``vitquant eval --quantized CALIB --int8`` gives the fake-quant model's results.

The calibrated model has LayerScale and random biases, LayerNorms and gammas (a lowering that
mishandles any of them changes its logits). The test runs the command twice, without and with
``--int8``, records the model each run evaluated, and compares the two on the evaluated images:
top-1 agreement and logits, then the metrics the command wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import vitquant.cli as cli
import vitquant.train.evaluation as evaluation
from helpers import randomize_affine
from vitquant import create_model
from vitquant.data import build_dataset, subset
from vitquant.quant import QuantConfig, calibrate, prepare, save_calibrated
from vitquant.runtime import is_lowered

KWARGS = {"num_classes": 10, "in_chans": 1, "init_values": 0.5}
SUBSET = 96
_EVALUATE = evaluation.evaluate_model_on


def _data(data_path: str, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ds = subset(build_dataset(data_path, split, img_size=28, train_transform=False), n, seed=seed)
    pairs = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs])


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained model (its predictions depend on the image, unlike a random one's),
    started from random biases, LayerNorms and gammas, calibrated with ft1 and saved."""
    torch.manual_seed(0)
    model = randomize_affine(create_model("vit_nano_patch4_28", **KWARGS))
    x, y = _data("digits", "train", 512)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(60):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    prepare(model.eval(), QuantConfig("ft1"))
    calibrate(model, [x[:32], x[32:64]], method="max", progress=False)
    return save_calibrated(
        model,
        tmp_path_factory.mktemp("calib") / "calib.pth",
        model_name="vit_nano_patch4_28",
        model_kwargs=KWARGS,
    )


def _run_eval(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], out: Path
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Runs ``vitquant eval``; returns the model it evaluated, how, and the JSON it wrote."""
    seen: dict[str, Any] = {}

    def spy(model: torch.nn.Module, data_path: str, split: str, **kw: Any) -> dict[str, float]:
        seen.update(model=model, data_path=data_path, split=split, **kw)
        return _EVALUATE(model, data_path, split, **kw)

    monkeypatch.setattr(evaluation, "evaluate_model_on", spy)
    assert cli.main([*argv, "--output", str(out)]) == 0
    return seen.pop("model"), seen, json.loads(out.read_text())


def test_int8_eval_agrees_with_fake_quant_eval(
    calib_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["eval", "--quantized", str(calib_file), "--data-path", "digits"]
    argv += ["--subset", str(SUBSET), "--seed", "0"]
    fq, how, fq_res = _run_eval(monkeypatch, argv, tmp_path / "fq.json")
    i8, how8, i8_res = _run_eval(monkeypatch, [*argv, "--int8"], tmp_path / "int8.json")
    assert is_lowered(i8) and not is_lowered(fq)
    assert how8 == how and i8_res["int8"] is True and "int8" not in fq_res
    assert fq_res["images"] == i8_res["images"] == SUBSET

    # the images the command evaluated, through the public dataset calls it uses
    x, y = _data(how["data_path"], how["split"], how["subset"], how["seed"])
    with torch.no_grad():
        ref, got = fq(x), i8(x)
    assert len(set(ref.argmax(1).tolist())) >= 4  # the comparison below is not trivial
    assert 100 * float((ref.argmax(1) == y).float().mean()) == pytest.approx(fq_res["top1"])
    agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
    # relative to how much the logits vary between images (not to a constant offset)
    rel = float((got - ref).abs().max() / (ref - ref.mean(0)).abs().max())
    assert agree >= 0.95, agree
    assert rel < 0.02, rel
    # and the metrics written by the two runs
    assert abs(i8_res["top1"] - fq_res["top1"]) <= 100 * 3 / SUBSET
    assert i8_res["loss"] == pytest.approx(fq_res["loss"], rel=0.02)

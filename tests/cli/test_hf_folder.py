"""A Hugging Face ``transformers`` folder as ``--model`` / ``create_model(folder)``: converted to
vitquant's ViT (logits equal to transformers' own), calibrated and evaluated by the CLI, output
files named after the folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import HF_TINY, skip_without_transformers
from vitquant.cli import main
from vitquant.errors import ConfigError
from vitquant.models import create_model
from vitquant.quant import load_calibrated

skip_without_transformers()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vitquant.models.hf import import_transformers

    tf = import_transformers()
    torch.manual_seed(0)
    hf = tf.ViTForImageClassification(tf.ViTConfig(**{**HF_TINY, "num_labels": 10})).eval()
    path = tmp_path_factory.mktemp("hf") / "tiny-vit"
    hf.save_pretrained(path)
    return path


def test_create_model_reads_a_folder(folder: Path) -> None:
    from vitquant.models.hf import load_hf_folder

    model = create_model(str(folder)).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), load_hf_folder(folder)(x).logits, atol=1e-5, rtol=0)
    assert create_model(str(folder), num_classes=10).num_classes == 10
    with pytest.raises(ConfigError, match="predicts 10 classes"):
        create_model(str(folder), num_classes=7)
    assert create_model(str(folder), img_size=28).patch_embed.img_size == (28, 28)
    with pytest.raises(ConfigError, match="for 28x28 images, not img_size=56"):
        create_model(str(folder), img_size=56)
    with pytest.raises(ConfigError, match="Hugging Face folder"):
        create_model(str(folder), drop_path_rate=0.1)


def test_cli_calibrates_and_evaluates_a_folder(folder: Path, tmp_path: Path) -> None:
    rc = main(
        ["calibrate", "--model", str(folder), "--data-path", "digits", "--img-size", "28",
         "--num-calib-batch", "2",
         "--calib-batchsz", "4", "--batch-size", "32", "--max-eval-batches", "1",
         "--quant-mode", "ft1", "--calib-output-path", str(tmp_path), "--device", "cpu",
         "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    calib = tmp_path / "tiny-vit_calib.pth"
    assert calib.is_file() and (tmp_path / "tiny-vit_calib.json").is_file()
    model = load_calibrated(calib)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    out = tmp_path / "eval.json"
    argv = ["eval", "--quantized", str(calib), "--data-path", "digits", "--img-size", "28",
            "--subset", "64",
            "--int8", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0 and out.is_file()

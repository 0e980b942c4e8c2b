"""A checkpoint's classifier head and the model's class count.

Without ``num_classes``, ``create_model`` takes the count of the checkpoint's head; a different
count asked for (or a model head the file lacks) is a ``CheckpointError`` naming both counts,
never a random head behind a log line. A new head is the explicit choice ``reset_head=True``, and
``vitquant train --finetune`` (DeiT's fine-tuning to the data's classes) makes it, saying so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vitquant import create_model
from vitquant.errors import CheckpointError
from vitquant.models.checkpoints import head_num_classes, load_checkpoint
from vitquant.models.vit import VisionTransformer
from vitquant.train.build import load_finetune

MODEL = "vit_nano_patch4_28"  # 10 classes by default
LOGGER = "vitquant.models.checkpoints"


def _seven(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A 7-class model (not the default 10) saved as a training-style ``.pth``."""
    torch.manual_seed(3)
    src = create_model(MODEL, num_classes=7).eval()
    path = tmp_path / "seven.pth"
    torch.save({"model": src.state_dict()}, path)
    return src, path


def _body(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def test_num_classes_is_taken_from_the_checkpoint(tmp_path: Path) -> None:
    src, path = _seven(tmp_path)
    model = create_model(MODEL, checkpoint_path=str(path)).eval()
    assert model.num_classes == 7 and model.head.weight.shape[0] == 7
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
    assert head_num_classes(src.state_dict()) == 7 and head_num_classes({}) is None


def test_the_same_count_given_loads(tmp_path: Path) -> None:
    src, path = _seven(tmp_path)
    model = create_model(MODEL, num_classes=7, checkpoint_path=str(path))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_another_count_is_an_error_naming_both(tmp_path: Path) -> None:
    _, path = _seven(tmp_path)
    with pytest.raises(CheckpointError) as e:
        create_model(MODEL, num_classes=10, checkpoint_path=str(path))
    msg = str(e.value)
    assert str(path) in msg and "7 classes" in msg and "10" in msg and "\n" not in msg
    model = create_model(MODEL, num_classes=10)
    with pytest.raises(CheckpointError, match="predicts 7 classes but the model has 10"):
        load_checkpoint(model, path)


def test_pretrained_file_gives_its_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, path = _seven(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    torch.save(src.state_dict(), home / f"{MODEL}.pth")
    monkeypatch.setenv("VITQUANT_HOME", str(home))
    assert create_model(MODEL, pretrained=True).num_classes == 7
    with pytest.raises(CheckpointError, match="7 classes"):
        create_model(MODEL, pretrained=True, num_classes=10)


def test_reset_head_is_the_explicit_new_head(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, path = _seven(tmp_path)
    torch.manual_seed(0)
    fresh = create_model(MODEL, num_classes=10)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = create_model(MODEL, num_classes=10, checkpoint_path=str(path), reset_head=True)
    assert "7 classes" in caplog.text and "newly initialized" in caplog.text
    own, theirs = model.state_dict(), src.state_dict()
    for k, v in _body(theirs).items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    torch.testing.assert_close(model.head.weight, fresh.head.weight, rtol=0, atol=0)


def test_no_head_model_drops_the_files(tmp_path: Path) -> None:
    src, path = _seven(tmp_path)
    model = create_model(MODEL, num_classes=0, checkpoint_path=str(path))
    assert model.num_classes == 0
    for k, v in _body(src.state_dict()).items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_a_headless_checkpoint_needs_reset_head(tmp_path: Path) -> None:
    src, _ = _seven(tmp_path)
    path = tmp_path / "body.pth"
    torch.save(_body(src.state_dict()), path)
    with pytest.raises(CheckpointError, match="no classifier head for the model's 10 classes"):
        create_model(MODEL, checkpoint_path=str(path))
    model = create_model(MODEL, checkpoint_path=str(path), reset_head=True)
    assert model.num_classes == 10


def test_a_distilled_model_needs_both_heads(tmp_path: Path) -> None:
    arch = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    src = VisionTransformer(num_classes=7, distilled=True, **arch)
    path = tmp_path / "no_dist_head.pth"
    torch.save({k: v for k, v in src.state_dict().items() if "head_dist" not in k}, path)
    model = VisionTransformer(num_classes=7, distilled=True, **arch)
    with pytest.raises(CheckpointError, match="no classifier head_dist for the model's 7"):
        load_checkpoint(model, path)
    load_checkpoint(model, path, reset_head=True)
    torch.testing.assert_close(model.head.weight, src.head.weight, rtol=0, atol=0)


def test_another_architecture_is_reported_before_the_head(tmp_path: Path) -> None:
    other = create_model("vit_micro_patch7_28", num_classes=7)
    path = tmp_path / "micro.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit vit_nano_patch4_28"):
        create_model(MODEL, num_classes=10, checkpoint_path=str(path))


@pytest.mark.parametrize("name", [MODEL, "vit_nano_patch4_28_quant"])
def test_finetune_trains_a_new_head_and_says_so(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, path = _seven(tmp_path)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1)
    head = model.head.weight.detach().clone()
    load_finetune(model, str(path), name)
    err = capsys.readouterr().err
    assert "--finetune" in err and "7 classes" in err and "10 classes" in err and "new head" in err
    torch.testing.assert_close(model.head.weight, head, rtol=0, atol=0)
    own = model.state_dict()
    assert torch.equal(own["patch_embed.proj.weight"], src.state_dict()["patch_embed.proj.weight"])
    # the same class count: no new head, nothing said
    same = create_model(name, num_classes=7, in_chans=1)
    load_finetune(same, str(path), name)
    assert capsys.readouterr().err == ""
    torch.testing.assert_close(same.head.weight, src.head.weight, rtol=0, atol=0)

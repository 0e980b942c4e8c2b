"""The photo datasets on torchvision's parts: same samples as ``torchvision.datasets.ImageFolder``,
same pixels as a ``torchvision.transforms.v2`` pipeline, a clear error when torchvision is missing,
and in-memory datasets that never need it."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitquant._optional as opt
from vitquant.data import ImageFolderDataset, build_dataset
from vitquant.data.keys import SampleKey

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def tv() -> types.ModuleType:
    return opt.import_torchvision()


def _save(path: Path, seed: int, size: tuple[int, int] = (23, 17)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_samples_are_torchvisions_image_folder(tmp_path: Path, tv: types.ModuleType) -> None:
    train = tmp_path / "train"
    # "b/sub/deep" after "b/sub-2": torchvision sorts os.walk's folders by path
    names = ["b/x.png", "b/sub/y.PNG", "b/sub/deep/w.png", "b/sub-2/z.bmp", "a/q.jpg", "a/r.txt"]
    names.append("c/s.webp")
    for i, rel in enumerate(names):
        if rel.endswith(".txt"):
            (train / rel).parent.mkdir(parents=True, exist_ok=True)
            (train / rel).write_text("not an image")
        else:
            _save(train / rel, i)
    ours = ImageFolderDataset(train)
    ref = tv.datasets.ImageFolder(str(train))
    assert ours.classes == ref.classes and ours.class_to_idx == ref.class_to_idx
    assert ours.samples == ref.samples  # same order (nested folders too) and labels
    assert list(ours.targets) == ref.targets


def test_val_split_keeps_training_labels(tmp_path: Path, tv: types.ModuleType) -> None:
    for rel in ("train/a/1.png", "train/b/2.png", "train/c/3.png", "val/a/4.png", "val/c/5.png"):
        _save(tmp_path / rel, len(rel))
    (tmp_path / "val" / ".ipynb_checkpoints").mkdir()
    val = build_dataset(str(tmp_path), "val", img_size=8)
    assert val.classes == ["a", "b", "c"] and list(val.targets) == [0, 2]
    ref = tv.datasets.ImageFolder(str(tmp_path / "val"), allow_empty=True)
    assert [p for p, _ in val.samples] == [p for p, _ in ref.samples if ".ipynb" not in p]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_pixels_are_a_v2_pipeline(
    tmp_path: Path, tv: types.ModuleType, interpolation: str
) -> None:
    _save(tmp_path / "val" / "a" / "0.png", 0, size=(41, 29))
    ds = build_dataset(
        str(tmp_path), "val", img_size=20, crop_pct=0.875, interpolation=interpolation
    )
    from torchvision.transforms import v2

    ref = v2.Compose(
        [
            v2.Resize(int(20 / 0.875), interpolation=v2.InterpolationMode(interpolation)),
            v2.CenterCrop(20),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    img = tv.datasets.folder.pil_loader(str(tmp_path / "val" / "a" / "0.png"))
    torch.testing.assert_close(ds[0][0], ref(img), atol=1e-6, rtol=0)


def test_train_pixels_follow_the_key(tmp_path: Path, tv: types.ModuleType) -> None:
    """Keyed sampling decides the box and the flip; torchvision's v2 ops draw the pixels."""
    _save(tmp_path / "train" / "a" / "0.png", 0, size=(40, 30))
    ds = build_dataset(str(tmp_path), "train", img_size=12, scale=(0.3, 1.0))
    a, b = ds[SampleKey(0, 1, 2, 0)][0], ds[SampleKey(0, 1, 2, 0)][0]
    assert torch.equal(a, b)
    outs = {ds[SampleKey(0, 1, e, 0)][0].sum().item() for e in range(6)}
    assert len(outs) > 1  # another epoch, another crop
    torch.manual_seed(0)
    g = torch.get_rng_state()
    ds[0]  # a bare index draws from the global RNG, as torchvision's transforms do
    assert not torch.equal(g, torch.get_rng_state())


def test_missing_torchvision_is_a_clear_error_for_photos_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path / "train" / "a" / "0.png", 0)
    monkeypatch.setattr(opt, "_MODULES", {})
    monkeypatch.setattr(opt, "_dist_version", lambda name: None)
    monkeypatch.setattr(opt.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(opt.MissingDependencyError, match=r"pip install 'vitquant\[vision\]'"):
        build_dataset(str(tmp_path), "train")
    with pytest.raises(opt.MissingDependencyError, match="torchvision is not installed"):
        ImageFolderDataset(tmp_path / "train")  # listing the files needs it too
    digits = build_dataset("digits", "train", img_size=12)  # in memory: no torchvision
    assert digits[SampleKey(3, 0, 0, 0)][0].shape == (1, 12, 12)


def test_in_memory_datasets_import_no_torchvision(tmp_path: Path, makers: dict) -> None:
    root, _ = makers["idx"](tmp_path / "idx")
    code = (
        "import sys\n"
        "sys.modules['torchvision'] = None\n"  # any import of torchvision now fails
        "from vitquant.data import build_dataset, build_loader, set_epoch\n"
        f"ds = build_dataset({str(root)!r}, 'train', img_size=16, augment='rrc')\n"
        "loader = build_loader(ds, 8, train=True, seed=0); set_epoch(loader, 0)\n"
        "x, y = next(iter(loader)); assert x.shape == (8, 1, 16, 16), x.shape\n"
        "build_dataset('digits', 'val')[0]\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]

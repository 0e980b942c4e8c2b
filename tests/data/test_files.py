"""Image folders and zipped ImageNet: labels, pixels, map files, lazy zips, errors."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitquant.data import ImageFolderDataset, build_dataset, build_loader, dataset_info, set_epoch
from vitquant.data.zipdata import ZipImageDataset
from vitquant.errors import DataError


def _pixels(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    return ((x * s + m) * 255).permute(1, 2, 0).numpy()


def test_image_folder_labels_and_classes(tmp_path: Path, makers: dict) -> None:
    layout = {"train": {"cat": 2, "dog": 3, "emu": 1}, "val": {"cat": 1, "emu": 2}}
    files = makers["folder"](tmp_path, layout)
    train = build_dataset(str(tmp_path), "train", img_size=8)
    val = build_dataset(str(tmp_path), "val", img_size=8)
    assert train.classes == ["cat", "dog", "emu"] == val.classes
    assert list(train.targets) == [0, 0, 1, 1, 1, 2]
    assert list(val.targets) == [0, 2, 2]  # emu keeps label 2 although val has no dog
    x, y = val[1]
    assert x.shape == (3, 8, 8) and y == 2
    info = dataset_info(str(tmp_path))
    assert (info.num_classes, info.in_chans, info.img_size) == (3, 3, 224)
    assert info.mean == (0.485, 0.456, 0.406)
    assert [Path(p) for p, _ in val.samples] == sorted(files["val"])


def test_image_folder_pixels_exact(tmp_path: Path, makers: dict) -> None:
    files = makers["folder"](tmp_path, {"train": {"a": 2}}, size=(16, 16))
    # native size and crop_pct 1: the evaluation transform only converts and normalises
    ds = build_dataset(str(tmp_path), "train", img_size=16, train_transform=False, crop_pct=1.0)
    x, _ = ds[1]
    want = np.asarray(Image.open(files["train"][1]).convert("RGB"), dtype=np.float64)
    np.testing.assert_allclose(_pixels(x, ds.info.mean, ds.info.std), want, atol=1e-3)
    grey = build_dataset(str(tmp_path), "train", in_chans=1, train_transform=False)
    assert grey[0][0].shape == (1, 224, 224) and len(grey.info.mean) == 1


def test_image_folder_errors(tmp_path: Path, makers: dict) -> None:
    with pytest.raises(DataError, match="not found"):
        build_dataset(str(tmp_path / "missing"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the dataset layout"):
        build_dataset(str(tmp_path / "empty"), "train")
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset(str(tmp_path / "noclass"), "train")
    (tmp_path / "noimg" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="has no images"):
        build_dataset(str(tmp_path / "noimg"), "train")
    makers["folder"](tmp_path / "ok", {"train": {"a": 1}, "val": {"b": 1}})
    with pytest.raises(DataError, match="not a class of the training split"):
        build_dataset(str(tmp_path / "ok"), "val")
    makers["folder"](tmp_path / "only_train", {"train": {"a": 1}})
    with pytest.raises(DataError, match="no val folder"):
        build_dataset(str(tmp_path / "only_train"), "val")
    bad = tmp_path / "corrupt"
    makers["folder"](bad, {"train": {"a": 1}})
    (bad / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = build_dataset(str(bad), "train")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg"):
        ds[0]  # sorted: broken.jpg comes before img0.png


def test_zip_dataset(tmp_path: Path, makers: dict) -> None:
    raw = makers["zip"](tmp_path, train_prefix="train/", val_prefix="")
    train = build_dataset(str(tmp_path), "train", img_size=8)
    val = build_dataset(str(tmp_path), "val", img_size=18, crop_pct=1.0, train_transform=False)
    assert isinstance(train, ZipImageDataset)
    assert len(train) == 6 and len(val) == 4
    assert list(val.targets) == [label for _, label, _ in raw["val"]]
    assert train.info.num_classes == 3 and train.classes is None
    # 18x16 image, img_size 18 -> shorter side 16 resized to 18 (bicubic), centre crop: compare
    # with PIL done by hand
    rel, label, arr = raw["val"][2]
    img = Image.fromarray(arr).resize((int(18 * 18 / 16), 18), Image.Resampling.BICUBIC)
    left = int(round((img.width - 18) / 2.0))
    want = np.asarray(img.crop((left, 0, left + 18, 18)), dtype=np.float64)
    x, y = val[2]
    assert y == label
    np.testing.assert_allclose(_pixels(x, val.info.mean, val.info.std), want, atol=1e-3)


def test_zip_is_opened_lazily_and_pickles(tmp_path: Path, makers: dict) -> None:
    makers["zip"](tmp_path)
    ds = build_dataset(str(tmp_path), "train", img_size=8)
    assert ds._zip is None  # nothing opened at construction
    ds[0]
    assert ds._zip is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._zip is None
    assert torch.equal(clone[(1, 0, 0, 0)][0], ds[(1, 0, 0, 0)][0])
    loader = build_loader(ds, 3, train=True, num_workers=2, seed=1)
    set_epoch(loader, 0)
    batches = [x for x, _ in loader]
    loader0 = build_loader(ds, 3, train=True, num_workers=0, seed=1)
    set_epoch(loader0, 0)
    for a, (b, _) in zip(batches, loader0):
        assert torch.equal(a, b)  # workers change nothing: augmentation follows the keys
    ds.close()


def test_map_file_errors(tmp_path: Path, makers: dict) -> None:
    makers["zip"](tmp_path)
    m = tmp_path / "val_map.txt"
    lines = m.read_text().splitlines()
    m.write_text("\n".join([lines[0], "", "n00/only_a_path.png"]) + "\n")
    with pytest.raises(DataError, match=r"val_map\.txt:3: malformed line 'n00/only_a_path\.png'"):
        build_dataset(str(tmp_path), "val")
    m.write_text(lines[0] + "\nn01/img_1.png\tseven\n")
    with pytest.raises(DataError, match=r"val_map\.txt:2: malformed line"):
        build_dataset(str(tmp_path), "val")
    m.write_text(lines[0] + "\nn01/img_1.png\t-1\n")
    with pytest.raises(DataError, match=r"val_map\.txt:2: label -1 is out of range"):
        build_dataset(str(tmp_path), "val")
    m.write_text("\n".join(lines) + "\n")
    m.write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")  # line numbers count blank lines
    with pytest.raises(DataError, match=r"val_map\.txt:4: label 2 of .* out of range \[0, 2\)"):
        ZipImageDataset(tmp_path / "val.zip", m, num_classes=2)
    m.write_text(lines[0] + "\nn01/not_in_zip.png\t1\n")
    with pytest.raises(
        DataError, match=r"lists n01/not_in_zip\.png, which .*val\.zip does not hold"
    ):
        build_dataset(str(tmp_path), "val")
    m.write_text(" \n")
    with pytest.raises(DataError, match="lists no images"):
        build_dataset(str(tmp_path), "val")


def test_zip_label_out_of_range_has_line_number(tmp_path: Path, makers: dict) -> None:
    makers["zip"](tmp_path)
    with pytest.raises(
        DataError, match=r"train_map\.txt:3: label 2 of n02/img_2\.png is out of range \[0, 2\)"
    ):
        build_dataset(str(tmp_path), "train", num_classes=2)


def test_corrupt_zip(tmp_path: Path, makers: dict) -> None:
    makers["zip"](tmp_path)
    (tmp_path / "train.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match=r"train\.zip is not a readable zip file"):
        build_dataset(str(tmp_path), "train")
    (tmp_path / "val.zip").unlink()
    with pytest.raises(DataError, match=r"zip file .*val\.zip not found"):
        build_dataset(str(tmp_path), "val")


def test_image_folder_class_direct(tmp_path: Path, makers: dict) -> None:
    makers["folder"](tmp_path, {"train": {"a": 1, "b": 1}})
    ds = ImageFolderDataset(tmp_path / "train")
    img, y = ds[1]
    assert isinstance(img, Image.Image) and y == 1  # no transform: PIL images
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        zf.writestr("a.txt", "x")
    with pytest.raises(DataError, match="is a file"):
        build_dataset(str(tmp_path / "x.zip"), "train")

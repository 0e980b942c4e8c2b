"""build_dataset / dataset_info: names, layout detection, options, digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vitquant.data import SampleKey, build_dataset, dataset_info
from vitquant.errors import ConfigError, DataError


def test_digits_split_is_deterministic_and_complete() -> None:
    sk = pytest.importorskip("sklearn.datasets")
    ref = sk.load_digits()
    train, val = build_dataset("digits", "train"), build_dataset("Digits", "validation")
    assert (len(train), len(val)) == (1437, 360)
    idx = np.arange(len(ref.target))
    assert list(val.targets) == ref.target[idx % 5 == 0].tolist()
    assert list(train.targets) == ref.target[idx % 5 != 0].tolist()
    x, _ = build_dataset("digits", "val", mean=(0.0,), std=(1.0,))[1]
    np.testing.assert_allclose(x[0].numpy() * 16, ref.images[5], atol=16 / 255 / 2 + 1e-6)
    info = dataset_info("digits")
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 8)
    assert info == train.info


def test_overrides(idx_folder: tuple) -> None:
    folder, raw = idx_folder
    ds = build_dataset(
        str(folder), "train", img_size=20, in_chans=3, mean="inception", train_transform=False
    )
    x, _ = ds[0]
    assert x.shape == (3, 20, 20) and torch.equal(x[0], x[2])
    assert ds.info.mean == (0.5, 0.5, 0.5) and ds.info.in_chans == 3 and ds.info.img_size == 12
    assert dataset_info(str(folder), in_chans=3, mean="inception") == ds.info
    # augment="none" on the training split gives the evaluation transform
    a = build_dataset(str(folder), "train", augment="none")[SampleKey(4, 0, 1, 0)][0]
    b = build_dataset(str(folder), "val", train_transform=False)
    assert torch.equal(a, build_dataset(str(folder), "train", train_transform=False)[4][0])
    assert b[0][0].shape == (1, 12, 12)
    rrc = build_dataset(str(folder), "train", augment="rrc", img_size=16, scale=(0.5, 1.0))
    assert rrc[SampleKey(0)][0].shape == (1, 16, 16)
    flipless = build_dataset(str(folder), "train", pad=0, hflip=0)
    assert torch.equal(flipless[SampleKey(2, 0, 5)][0], flipless[2][0])  # nothing random left


def test_default_train_augmentation_changes_with_epoch(idx_folder: tuple) -> None:
    folder, _ = idx_folder
    ds = build_dataset(str(folder), "train")
    outs = [ds[SampleKey(1, 0, e)][0] for e in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_name_and_option_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'fmnst'.*fmnist"):
        build_dataset("fmnst", "train")
    with pytest.raises(ConfigError, match="unknown dataset option 'img_sz'"):
        build_dataset("digits", "train", img_sz=3)
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        build_dataset("digits", "dev")
    with pytest.raises(ConfigError, match="augment must be one of"):
        build_dataset("digits", "train", augment="autoaugment")
    with pytest.raises(ConfigError, match="in_chans must be 1 or 3"):
        build_dataset("digits", "train", in_chans=2)
    with pytest.raises(DataError, match="dataset folder .*not found"):
        build_dataset(str(tmp_path / "a" / "b"), "train")


def test_layout_detection(tmp_path: Path, makers: dict) -> None:
    makers["idx"](tmp_path / "idx")
    makers["cifar10"](tmp_path / "cifar" / "cifar-10-batches-py")
    makers["folder"](tmp_path / "folder", {"train": {"a": 1}})
    makers["zip"](tmp_path / "zip")
    kinds = {
        "idx": "TensorImageDataset",
        "cifar": "TensorImageDataset",
        "folder": "ImageFolderDataset",
        "zip": "ZipImageDataset",
    }
    for sub, cls in kinds.items():
        ds = build_dataset(str(tmp_path / sub), "train", img_size=8)
        assert type(ds).__name__ == cls
        assert ds[0][0].shape[-1] == 8

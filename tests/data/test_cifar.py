"""CIFAR batches: layout, pixel order, class names, and the restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vitquant.data import build_dataset, dataset_info, read_batch
from vitquant.errors import ConfigError, DataError


def test_cifar10_layout_and_pixels(tmp_path: Path, makers: dict) -> None:
    raw = makers["cifar10"](tmp_path / "cifar-10-batches-py")
    # the parent folder is accepted too, through the builtin name
    train = build_dataset("cifar10", "train", data_path=str(tmp_path), train_transform=False)
    val = build_dataset(str(tmp_path / "cifar-10-batches-py"), "val")
    assert (len(train), len(val)) == (12, 5)
    assert list(train.targets) == raw["train_labels"].tolist()
    assert train.classes == [f"class{i}" for i in range(10)]
    x, _ = train[7]
    assert x.shape == (3, 32, 32)
    # independent decoding of the CIFAR row: R plane, G plane, B plane, each row-major
    row = raw["train_data"][7]
    want = np.stack([row[c * 1024 : (c + 1) * 1024].reshape(32, 32) for c in range(3)])
    m = torch.tensor(train.info.mean).view(3, 1, 1)
    s = torch.tensor(train.info.std).view(3, 1, 1)
    np.testing.assert_allclose(((x * s + m) * 255).numpy(), want, atol=1e-3)
    # normalisation statistics: those of the training images, per channel
    planes = raw["train_data"].reshape(-1, 3, 1024).astype(np.float64) / 255
    assert train.info.mean == pytest.approx(tuple(planes.mean(axis=(0, 2))), abs=1e-9)
    assert train.info.std == pytest.approx(tuple(planes.std(axis=(0, 2))), abs=1e-9)
    assert val.info.mean == train.info.mean


def test_cifar100_fine_and_coarse(tmp_path: Path, makers: dict) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 8), ("test", 3)):
        obj = {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
        }
        (root / name).write_bytes(pickle.dumps(obj, protocol=2))
        if name == "train":
            fine, coarse = obj[b"fine_labels"], obj[b"coarse_labels"]
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": []}
    (root / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    ds = build_dataset("cifar100", "train", data_path=str(root))
    assert list(ds.targets) == fine and ds.info.num_classes == 100 and ds.classes[5] == "f5"
    dc = build_dataset(str(tmp_path), "train", label_mode="coarse")
    assert list(dc.targets) == coarse and dc.info.num_classes == 20 and dc.classes is None
    assert len(build_dataset(str(root), "test")) == 3
    with pytest.raises(DataError, match="holds cifar100, not cifar10"):
        build_dataset("cifar10", "train", data_path=str(root))


def test_cifar_needs_data_path() -> None:
    with pytest.raises(ConfigError, match="cifar10 needs data_path"):
        dataset_info("cifar10")


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.target,))


def test_refuses_code_in_pickles(tmp_path: Path, makers: dict) -> None:
    makers["cifar10"](tmp_path)
    marker = tmp_path / "pwned"
    payload = {b"labels": [1], b"data": np.zeros((1, 3072), np.uint8), b"x": _Evil(str(marker))}
    for proto in (2, 4):
        (tmp_path / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=proto))
        with pytest.raises(
            DataError, match=r"refusing to unpickle posix\.mkdir from .*data_batch_1"
        ):
            build_dataset(str(tmp_path), "train")
        assert not marker.exists()
    # arbitrary classes are refused too, even harmless-looking ones
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"labels": [0], b"data": io.BytesIO()}))
    with pytest.raises(DataError, match="refusing to unpickle _io.BytesIO"):
        build_dataset(str(tmp_path), "val")


@pytest.mark.parametrize("proto", [2, 3, 4, 5])
def test_numpy_arrays_load_under_every_protocol(tmp_path: Path, proto: int) -> None:
    arr = np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072)
    p = tmp_path / "b"
    p.write_bytes(pickle.dumps({"data": arr, "labels": [0, 1]}, protocol=proto))
    got = read_batch(p)
    np.testing.assert_array_equal(got["data"], arr)
    assert got["labels"] == [0, 1]


def test_malformed_batches(tmp_path: Path, makers: dict) -> None:
    makers["cifar10"](tmp_path)
    batch = tmp_path / "data_batch_2"
    makers["cifar_batch"](batch, np.zeros((2, 100), np.uint8), [0, 1])
    with pytest.raises(DataError, match=r"'data' must be uint8 \[N, 3072\]"):
        build_dataset(str(tmp_path), "train")
    makers["cifar_batch"](batch, np.zeros((2, 3072), np.uint8), [0, 12])
    with pytest.raises(DataError, match="label 12 .* out of range"):
        build_dataset(str(tmp_path), "train")
    batch.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="cannot read CIFAR batch"):
        build_dataset(str(tmp_path), "train")
    batch.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(DataError, match="holds a list, expected a dict"):
        build_dataset(str(tmp_path), "train")

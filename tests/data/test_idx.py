"""IDX files: parsing, split loading, statistics, errors, and the real Fashion-MNIST."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from vitquant.data import FASHION_MNIST_DIR, build_dataset, dataset_info, read_idx
from vitquant.errors import DataError


def _denorm(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    return ((x * s + m) * 255.0).numpy()


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path: Path, makers: dict, gz: bool) -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    p = makers["write_idx"](tmp_path / ("x.idx3" + (".gz" if gz else "")), arr)
    got = read_idx(p)
    assert got.dtype == np.uint8 and got.shape == (5, 7, 3)
    np.testing.assert_array_equal(got, arr)


def test_split_shapes_labels_and_pixels(idx_folder: tuple) -> None:
    folder, raw = idx_folder
    for split in ("train", "val"):
        ds = build_dataset(str(folder), split, train_transform=False)
        images, labels = raw[split]
        assert len(ds) == len(images)
        assert torch.equal(torch.as_tensor(ds.targets), torch.from_numpy(labels.astype(np.int64)))
        x, y = ds[3]
        assert x.shape == (1, 12, 12) and x.dtype == torch.float32 and y == int(labels[3])
        np.testing.assert_allclose(_denorm(x, ds.info.mean, ds.info.std)[0], images[3], atol=1e-3)
    assert ds.classes is None  # not Fashion-MNIST: no names


def test_statistics_are_the_training_split(idx_folder: tuple) -> None:
    folder, raw = idx_folder
    info = dataset_info(str(folder))
    pixels = raw["train"][0].astype(np.float64) / 255.0
    assert info.mean == pytest.approx((pixels.mean(),), abs=1e-9)
    assert info.std == pytest.approx((pixels.std(),), abs=1e-9)
    assert (info.num_classes, info.in_chans, info.img_size) == (4, 1, 12)
    val = build_dataset(str(folder), "val")
    assert val.info.mean == info.mean  # the val split is normalised with training statistics


def test_wrong_magic(tmp_path: Path, makers: dict) -> None:
    folder, _ = makers["idx"](tmp_path / "d", gz=False)
    p = folder / "train-images-idx3-ubyte"
    data = bytearray(p.read_bytes())
    data[0:4] = b"\x12\x34\x08\x03"
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match="not an IDX file.*magic bytes 12340803"):
        build_dataset(str(folder), "train")


def test_truncated(tmp_path: Path, makers: dict) -> None:
    folder, _ = makers["idx"](tmp_path / "d", gz=False)
    p = folder / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        build_dataset(str(folder), "val")
    p.write_bytes(p.read_bytes()[:6])
    with pytest.raises(DataError, match="truncated inside its header"):
        read_idx(p)


def test_corrupt_gzip(tmp_path: Path, makers: dict) -> None:
    folder, _ = makers["idx"](tmp_path / "d")
    p = folder / "train-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x05abcde")[:-12])
    with pytest.raises(DataError, match="cannot read IDX file"):
        build_dataset(str(folder), "train")


def test_missing_files_hint(tmp_path: Path, makers: dict) -> None:
    folder, _ = makers["idx"](tmp_path / "d")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_dataset(str(folder), "val")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion-mnist", "train", data_path=str(tmp_path / "nowhere"))


def test_length_mismatch_and_label_range(tmp_path: Path, makers: dict) -> None:
    folder, raw = makers["idx"](tmp_path / "d", classes=4)
    makers["write_idx"](folder / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 9] * 4, np.uint8))
    with pytest.raises(DataError, match=r"label 9 of sample 2 .* out of range \[0, 4\)"):
        build_dataset(str(folder), "val")
    makers["write_idx"](folder / "t10k-labels-idx1-ubyte.gz", np.array([0, 1], np.uint8))
    with pytest.raises(DataError, match="12 images but .* 2 labels"):
        build_dataset(str(folder), "val")
    with pytest.raises(DataError, match="out of range"):
        build_dataset(str(folder), "train", num_classes=3)


def test_dotted_names_and_uncompressed(tmp_path: Path, makers: dict) -> None:
    folder, raw = makers["idx"](tmp_path / "d", gz=False)
    for f in folder.iterdir():
        f.rename(f.with_name(f.name.replace("-idx", ".idx")))
    ds = build_dataset(str(folder), "train")
    assert len(ds) == len(raw["train"][0])


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist() -> None:
    info = dataset_info("fashion-mnist")
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 28)
    assert info.mean[0] == pytest.approx(0.2860, abs=5e-4)
    assert info.std[0] == pytest.approx(0.3530, abs=5e-4)
    train = build_dataset("fashion_mnist", "train")
    val = build_dataset("fmnist", "test")
    assert (len(train), len(val)) == (60000, 10000)
    for ds in (train, val):
        t = torch.as_tensor(ds.targets)
        assert int(t.min()) == 0 and int(t.max()) == 9
        assert torch.bincount(t).tolist() == [len(ds) // 10] * 10  # balanced classes
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    x, _ = train[0]
    assert x.shape == (1, 28, 28)

"""Makers of tiny datasets on disk, in every format the data package reads."""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_idx(path: Path, arr: np.ndarray, *, gz: bool | None = None) -> Path:
    """Writes ``arr`` (uint8) as an IDX file; gzipped when the name ends in .gz."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    if gz if gz is not None else path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_idx_folder(
    root: Path,
    n_train: int = 40,
    n_val: int = 12,
    size: int = 12,
    classes: int = 4,
    gz: bool = True,
) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """An MNIST-style folder; returns it and the raw (images, labels) of each split."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    ext = ".gz" if gz else ""
    for split, prefix, n in (("train", "train", n_train), ("val", "t10k", n_val)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % classes).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        out[split] = (images, labels)
    return root, out


def cifar_batch(path: Path, data: np.ndarray, labels: list[int], key: bytes = b"labels") -> None:
    """A CIFAR batch as the originals: protocol-2 pickle with bytes keys."""
    obj = {
        b"batch_label": b"test",
        key: labels,
        b"data": data,
        b"filenames": [b"a.png"] * len(labels),
    }
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(
    root: Path, per_batch: int = 6, n_batches: int = 2, n_test: int = 5
) -> dict[str, np.ndarray]:
    """A tiny cifar-10-batches-py folder; returns raw data and labels per split."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    tr_data, tr_lab = [], []
    for b in range(1, n_batches + 1):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        cifar_batch(root / f"data_batch_{b}", data, labels)
        tr_data.append(data)
        tr_lab += labels
    test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in rng.integers(0, 10, n_test)]
    cifar_batch(root / "test_batch", test, test_labels)
    names = [f"class{i}".encode() for i in range(10)]
    (root / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2)
    )
    return {
        "train_data": np.concatenate(tr_data),
        "train_labels": np.array(tr_lab),
        "val_data": test,
        "val_labels": np.array(test_labels),
    }


def make_image_folder(
    root: Path,
    layout: dict[str, dict[str, int]],
    size: tuple[int, int] = (20, 14),
    ext: str = ".png",
) -> dict[str, list[Path]]:
    """``layout[split][class] = count`` images of random colours; returns the files per split."""
    rng = np.random.default_rng(2)
    files: dict[str, list[Path]] = {}
    for split, classes in layout.items():
        files[split] = []
        for cls, count in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                p = d / f"img{i}{ext}"
                Image.fromarray(arr).save(p)
                files[split].append(p)
    return files


def make_zip_imagenet(
    root: Path, n_train: int = 6, n_val: int = 4, train_prefix: str = "train/", val_prefix: str = ""
) -> dict[str, list[tuple[str, int, np.ndarray]]]:
    """train.zip/val.zip + map files; returns (member path, label, pixels) per split."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[tuple[str, int, np.ndarray]]] = {}
    for split, n, prefix in (("train", n_train, train_prefix), ("val", n_val, val_prefix)):
        out[split] = []
        lines = []
        with zipfile.ZipFile(root / f"{split}.zip", "w") as zf:
            for i in range(n):
                label = i % 3
                rel = f"n0{label}/img_{i}.png"
                arr = rng.integers(0, 256, size=(16, 18, 3), dtype=np.uint8)
                buf = _png_bytes(arr)
                zf.writestr(prefix + rel, buf)
                lines.append(f"{rel}\t{label}")
                out[split].append((rel, label, arr))
        (root / f"{split}_map.txt").write_text("\n".join(lines) + "\n")
    return out


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def idx_folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    return make_idx_folder(tmp_path / "mnistlike")


@pytest.fixture
def makers() -> dict[str, Callable]:
    return {
        "idx": make_idx_folder,
        "write_idx": write_idx,
        "cifar10": make_cifar10,
        "cifar_batch": cifar_batch,
        "folder": make_image_folder,
        "zip": make_zip_imagenet,
    }

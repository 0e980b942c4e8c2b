"""MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST ...), plain or gzipped.

The IDX format (LeCun et al., "Gradient-based learning applied to document recognition", 1998;
http://yann.lecun.com/exdb/mnist/) is a 4-byte magic ``00 00 <dtype> <ndim>``, ``ndim``
big-endian uint32 sizes, then the values in C order. Images are ``idx3`` (uint8, ``[N, H, W]``)
and labels ``idx1`` (uint8, ``[N]``). A folder holds ``train-images-idx3-ubyte[.gz]``,
``train-labels-idx1-ubyte[.gz]`` and the same with ``t10k-`` (the test split, used as ``val``).

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017, arXiv 1708.07747) comes from the Debian package
``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist/``.
"""

from __future__ import annotations

import functools
import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vitquant.data.stats import channel_stats
from vitquant.errors import DataError

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "IdxSplit",
    "read_idx",
    "find_idx_files",
    "has_idx_files",
    "idx_num_classes",
    "load_idx_split",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_PREFIXES = {"train": ("train",), "val": ("t10k", "test", "val")}
_INSTALL_HINT = "run `apt-get install dataset-fashion-mnist` or pass a folder of IDX files"


def read_idx(path: str | Path) -> np.ndarray:
    """Reads one IDX file (``.gz`` is decompressed).

    Args:
        path: the file.

    Returns:
        The array, with the file's shape and dtype (native byte order).

    Raises:
        DataError: unreadable or corrupt gzip, wrong magic, or truncated data.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = bytearray(f.read())
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    magic = bytes(data[:4])
    if len(data) < 4 or magic[:2] != b"\0\0" or magic[2] not in _DTYPES or magic[3] == 0:
        raise DataError(
            f"{path} is not an IDX file: magic bytes {magic.hex() or '(none)'}, "
            "expected 0000 08 01 (labels) or 0000 08 03 (images)"
        )
    ndim = magic[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", bytes(data[4:header]))
    dtype = np.dtype(_DTYPES[magic[2]])
    count = math.prod(dims)
    have, need = len(data) - header, count * dtype.itemsize
    if have < need:
        raise DataError(f"IDX file {path} is truncated: {have} data bytes, its header says {need}")
    if have > need:
        raise DataError(f"IDX file {path} has {have - need} bytes more than its header says")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _find(folder: Path, prefix: str, kind: str, ndim: int) -> Path | None:
    for name in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for suffix in ("", ".gz"):
            p = folder / (name + suffix)
            if p.is_file():
                return p
    return None


def find_idx_files(folder: str | Path, split: str) -> tuple[Path, Path]:
    """The images and labels files of ``split`` (``"train"`` or ``"val"``) in ``folder``.

    Raises:
        DataError: the folder or one of the two files is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"IDX folder {folder} not found; {_INSTALL_HINT}")
    for prefix in _PREFIXES[split]:
        images = _find(folder, prefix, "images", 3)
        labels = _find(folder, prefix, "labels", 1)
        if images is not None and labels is not None:
            return images, labels
    want = _PREFIXES[split][0]
    raise DataError(
        f"no {split} IDX files in {folder} (need {want}-images-idx3-ubyte[.gz] and "
        f"{want}-labels-idx1-ubyte[.gz]); {_INSTALL_HINT}"
    )


def has_idx_files(folder: Path) -> bool:
    """Whether ``folder`` holds at least one IDX images file."""
    return any(folder.glob("*idx3-ubyte*"))


@dataclass(frozen=True)
class IdxSplit:
    """One split of an IDX folder, in memory.

    Attributes:
        images: uint8 ``[N, 1, H, W]``.
        targets: int64 ``[N]``.
        num_classes: classes of the dataset (max training label + 1, or 10 for Fashion-MNIST).
        mean: mean pixel of the training split (fraction of 255).
        std: std of the training split.
        classes: class names when the folder is Fashion-MNIST, else ``None``.
    """

    images: Tensor
    targets: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None


def _file_id(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=8)
def _read_cached(file_id: tuple[str, int, int], ndim: int) -> np.ndarray:
    path = Path(file_id[0])
    arr = read_idx(path)
    if arr.ndim != ndim:
        kind = "images [N, H, W]" if ndim == 3 else "labels [N]"
        raise DataError(f"IDX file {path} has {arr.ndim} dimensions, expected {kind}")
    if ndim == 3 and arr.dtype != np.uint8:
        raise DataError(f"IDX images {path} hold {arr.dtype}, expected unsigned bytes")
    if ndim == 1 and arr.dtype.kind not in "iu":
        raise DataError(f"IDX labels {path} hold {arr.dtype}, expected integers")
    arr.flags.writeable = False
    return arr


@functools.lru_cache(maxsize=8)
def _stats_cached(file_id: tuple[str, int, int]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return channel_stats(_read_cached(file_id, 3)[:, None])


def _is_fashion(folder: Path) -> bool:
    return "fashion" in str(folder.resolve()).lower()


def idx_num_classes(folder: str | Path) -> int:
    """Number of classes: 10 for Fashion-MNIST, else the largest training label + 1."""
    folder = Path(folder)
    if _is_fashion(folder):
        return 10
    try:
        _, labels = find_idx_files(folder, "train")
    except DataError:
        _, labels = find_idx_files(folder, "val")
    return int(_read_cached(_file_id(labels), 1).max(initial=0)) + 1


def load_idx_split(folder: str | Path, split: str, num_classes: int | None = None) -> IdxSplit:
    """Loads ``split`` of an IDX folder (cached per process while the files are unchanged).

    Args:
        folder: folder of IDX files.
        split: ``"train"`` or ``"val"`` (the ``t10k`` files).
        num_classes: expected number of classes (default: :func:`idx_num_classes`).

    Returns:
        The split, with the training split's normalisation statistics.

    Raises:
        DataError: missing or corrupt files, images and labels of different lengths, or a label
            out of range.
    """
    folder = Path(folder)
    images_path, labels_path = find_idx_files(folder, split)
    images = _read_cached(_file_id(images_path), 3)
    labels = _read_cached(_file_id(labels_path), 1)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels"
        )
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images")
    n_cls = idx_num_classes(folder) if num_classes is None else int(num_classes)
    bad = np.flatnonzero((labels < 0) | (labels >= n_cls))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"label {int(labels[i])} of sample {i} in {labels_path} is out of range [0, {n_cls})"
        )
    try:
        stats_from, _ = find_idx_files(folder, "train")
    except DataError:
        stats_from = images_path
    mean, std = _stats_cached(_file_id(stats_from))
    return IdxSplit(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        targets=torch.from_numpy(labels.astype(np.int64)),
        num_classes=n_cls,
        mean=mean,
        std=std,
        classes=list(FASHION_MNIST_CLASSES) if _is_fashion(folder) and n_cls == 10 else None,
    )

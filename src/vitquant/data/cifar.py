"""CIFAR-10 and CIFAR-100 "python version" batches, read with a restricted unpickler.

The batches of Krizhevsky ("Learning multiple layers of features from tiny images", 2009;
https://www.cs.toronto.edu/~kriz/cifar.html) are pickles of plain dicts holding a uint8 array
``data [N, 3072]`` (1024 red, 1024 green, 1024 blue values of a 32x32 image, row-major) and a
list of labels. CIFAR-10: ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
``batches.meta`` (``label_names``), usually in ``cifar-10-batches-py/``. CIFAR-100: ``train``,
``test`` and ``meta`` (``fine_label_names``, ``coarse_label_names``) in ``cifar-100-python/``.

A pickle can run any callable it names, so the batches are never given to ``pickle.load``:
:class:`RestrictedUnpickler` resolves only the few numpy names that rebuild an array (and
``_codecs.encode``, which Python 3 protocol-2 pickles use for bytes), and refuses every other
name with a :class:`~vitquant.errors.DataError`.
"""

from __future__ import annotations

import functools
import importlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitquant.data.stats import channel_stats
from vitquant.errors import DataError

__all__ = [
    "RestrictedUnpickler",
    "read_batch",
    "CifarSplit",
    "find_cifar_dir",
    "cifar_kind",
    "load_cifar_split",
]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}
_SUBDIRS = ("cifar-10-batches-py", "cifar-100-python")


def _numpy_module(short: str) -> Any:
    if short in ("numpy", "_codecs"):
        return importlib.import_module(short)
    for prefix in ("numpy._core", "numpy.core"):  # numpy 2 renamed numpy.core to numpy._core
        try:
            return importlib.import_module(f"{prefix}.{short}")
        except ImportError:
            continue
    raise DataError(f"this numpy has no {short} module to rebuild CIFAR arrays")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays, dtypes and plain Python containers.

    Args:
        file: binary file object.
        source: file name used in error messages.
    """

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED.get((module, name))
        if target is None:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self.source}: CIFAR batches may only "
                "hold numpy arrays, lists and dicts"
            )
        return getattr(_numpy_module(target[0]), target[1])


def read_batch(path: str | Path) -> dict[str, Any]:
    """Reads one CIFAR batch (or meta file) safely.

    Args:
        path: the pickle file.

    Returns:
        Its dict, with ``str`` keys and ``str`` label names.

    Raises:
        DataError: unreadable file, forbidden pickle content, or not a dict.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, str(path)).load()  # type: ignore[arg-type]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"cannot read CIFAR batch {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR batch {path} holds a {type(obj).__name__}, expected a dict")

    def text(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.decode("utf-8", "replace")
        if isinstance(v, list):
            return [text(x) for x in v]
        return v

    return {text(k): (v if isinstance(v, np.ndarray) else text(v)) for k, v in obj.items()}


def find_cifar_dir(path: str | Path) -> Path | None:
    """The folder holding the batches: ``path`` itself or its CIFAR sub-folder; ``None`` if none."""
    path = Path(path)
    for d in (path, *(path / s for s in _SUBDIRS)):
        if cifar_kind(d) is not None:
            return d
    return None


def cifar_kind(folder: Path) -> str | None:
    """``"cifar10"``, ``"cifar100"`` or ``None`` for a folder, judged by its file names."""
    if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
        return "cifar10"
    if (folder / "meta").is_file() and (
        (folder / "train").is_file() or (folder / "test").is_file()
    ):
        return "cifar100"
    return None


@dataclass(frozen=True)
class CifarSplit:
    """One split of CIFAR, in memory.

    Attributes:
        images: uint8 ``[N, 3, 32, 32]``.
        targets: int64 ``[N]``.
        num_classes: 10, 100 (fine) or 20 (coarse).
        mean: per-channel mean of the training split.
        std: per-channel std of the training split.
        classes: class names from the meta file, when present.
        name: ``"cifar10"`` or ``"cifar100"``.
    """

    images: Tensor
    targets: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None
    name: str


def _split_files(folder: Path, kind: str, split: str) -> list[Path]:
    if kind == "cifar10":
        files = sorted(folder.glob("data_batch_*")) if split == "train" else [folder / "test_batch"]
    else:
        files = [folder / ("train" if split == "train" else "test")]
    files = [f for f in files if f.is_file()]
    if not files:
        want = "data_batch_1..5" if kind == "cifar10" and split == "train" else "the test batch"
        raise DataError(f"no {split} batches in CIFAR folder {folder} (expected {want})")
    return files


def _label_key(kind: str, label_mode: str) -> str:
    if kind == "cifar10":
        return "labels"
    if label_mode not in ("fine", "coarse"):
        raise DataError(f"CIFAR-100 label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    return f"{label_mode}_labels"


def _load_arrays(
    folder: str, kind: str, split: str, label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    return _load_files(_file_ids(folder, kind, split), label_key)


def _file_ids(folder: str, kind: str, split: str) -> tuple[tuple[str, int, int], ...]:
    ids = []
    for f in _split_files(Path(folder), kind, split):
        st = f.stat()
        ids.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(ids)


@functools.lru_cache(maxsize=4)
def _load_files(
    file_ids: tuple[tuple[str, int, int], ...], label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for file_id in file_ids:
        f = Path(file_id[0])
        batch = read_batch(f)
        data, lab = batch.get("data"), batch.get(label_key)
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3072
        ):
            desc = (
                f"{data.dtype} {data.shape}"
                if isinstance(data, np.ndarray)
                else type(data).__name__
            )
            raise DataError(f"CIFAR batch {f}: 'data' must be uint8 [N, 3072], got {desc}")
        if lab is None or len(lab) != len(data):
            raise DataError(f"CIFAR batch {f}: '{label_key}' missing or not one per image")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(lab, dtype=np.int64).reshape(-1))
    out_i, out_l = np.concatenate(images), np.concatenate(labels)
    out_i.flags.writeable = False
    out_l.flags.writeable = False
    return out_i, out_l


def _train_stats(
    folder: str, kind: str, label_key: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return _stats_files(_file_ids(folder, kind, "train"), label_key)


@functools.lru_cache(maxsize=4)
def _stats_files(
    file_ids: tuple[tuple[str, int, int], ...], label_key: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return channel_stats(_load_files(file_ids, label_key)[0])


def load_cifar_split(folder: str | Path, split: str, label_mode: str = "fine") -> CifarSplit:
    """Loads ``split`` (``"train"`` or ``"val"``, the test batch) of a CIFAR folder.

    Args:
        folder: the batches folder or its parent.
        split: ``"train"`` or ``"val"``.
        label_mode: CIFAR-100 labels, ``"fine"`` (100 classes) or ``"coarse"`` (20).

    Raises:
        DataError: no CIFAR batches, forbidden pickle content, malformed batch, label out of range.
    """
    found = find_cifar_dir(folder)
    if found is None:
        raise DataError(
            f"no CIFAR batches (data_batch_1, test_batch or train/test/meta) in {folder}"
        )
    kind = cifar_kind(found)
    assert kind is not None
    key = _label_key(kind, label_mode)
    images, labels = _load_arrays(str(found.resolve()), kind, split, key)
    n_cls = 10 if kind == "cifar10" else (100 if label_mode == "fine" else 20)
    bad = np.flatnonzero((labels < 0) | (labels >= n_cls))
    if len(bad):
        raise DataError(
            f"CIFAR label {int(labels[bad[0]])} of {split} sample {int(bad[0])} in {found} "
            f"is out of range [0, {n_cls})"
        )
    try:
        mean, std = _train_stats(str(found.resolve()), kind, key)
    except DataError:
        mean, std = channel_stats(images)
    return CifarSplit(
        images=torch.from_numpy(images.copy()),
        targets=torch.from_numpy(labels.copy()),
        num_classes=n_cls,
        mean=mean,
        std=std,
        classes=_class_names(found, kind, label_mode, n_cls),
        name=kind,
    )


def _class_names(folder: Path, kind: str, label_mode: str, n_cls: int) -> list[str] | None:
    meta = folder / ("batches.meta" if kind == "cifar10" else "meta")
    if not meta.is_file():
        return None
    key = "label_names" if kind == "cifar10" else f"{label_mode}_label_names"
    names = read_batch(meta).get(key)
    if isinstance(names, list) and len(names) == n_cls and all(isinstance(n, str) for n in names):
        return names
    return None

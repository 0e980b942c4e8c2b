"""One entry point for every dataset: :func:`build_dataset` and :func:`dataset_info`.

``name_or_path`` is a built-in name (:mod:`vitquant.data.builtin`) or a folder whose layout is
recognised, in this order:

1. ``*_map.txt`` next to zips: zipped ImageNet (:mod:`vitquant.data.zipdata`);
2. IDX files (``*idx3-ubyte*``): MNIST-style (:mod:`vitquant.data.idx`);
3. CIFAR python batches, in the folder or its ``cifar-10-batches-py``/``cifar-100-python``
   sub-folder (:mod:`vitquant.data.cifar`);
4. ``train/`` or ``val/`` sub-folders: image folders (:mod:`vitquant.data.folders`).

Splits are ``"train"`` and ``"val"`` (``"test"``, ``"eval"``, ``"validation"`` are aliases; for
IDX and CIFAR they select the test files). In-memory formats (IDX, CIFAR, digits) use the fast
uint8-tensor transforms and normalise with their training split's own statistics; photo formats
use PIL transforms and ImageNet statistics, as DeiT does.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vitquant.data.base import DatasetInfo, TensorImageDataset, VisionDataset
from vitquant.data.builtin import BUILTIN_NAMES, canonical_name, load_digits_split
from vitquant.data.cifar import find_cifar_dir, load_cifar_split
from vitquant.data.folders import ImageFolderDataset, find_classes, find_split_dir
from vitquant.data.idx import FASHION_MNIST_DIR, has_idx_files, load_idx_split
from vitquant.data.tensor_transforms import AUGMENTS, TensorTransform
from vitquant.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PilTrainTransform, resolve_norm
from vitquant.data.zipdata import ZipImageDataset, map_num_classes, read_map
from vitquant.errors import ConfigError, DataError

__all__ = ["build_dataset", "dataset_info", "canonical_split", "OPTIONS"]

SPLITS = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "val",
    "eval": "val",
}
OPTIONS = {
    "data_path": "folder of a built-in dataset (CIFAR, another Fashion-MNIST copy)",
    "crop_pct": "evaluation centre-crop fraction (photos: 0.875, in-memory: 1.0)",
    "interpolation": "PIL resampling: bicubic (default), bilinear, nearest",
    "scale": "area range of the random resized crop (default (0.08, 1.0))",
    "ratio": "aspect range of the random resized crop (default (3/4, 4/3))",
    "pad": "zero padding of the random crop of in-memory datasets",
    "hflip": "probability of a horizontal flip",
    "label_mode": "CIFAR-100 labels: fine (100) or coarse (20)",
    "num_classes": "number of classes (labels must be below it)",
}
# augmentation defaults of the in-memory formats: (pad, flip probability)
_TENSOR_AUG = {"idx": (2, 0.5), "cifar": (4, 0.5), "digits": (1, 0.0)}


@dataclass(frozen=True)
class _Source:
    fmt: str  # "zip" | "idx" | "cifar" | "digits" | "folder"
    path: Path | None
    name: str


def canonical_split(split: str) -> str:
    """``"train"`` or ``"val"`` for a split name or alias; ConfigError otherwise."""
    s = SPLITS.get(str(split).strip().lower())
    if s is None:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return s


def _detect(path: Path) -> str:
    if not path.exists():
        raise DataError(f"dataset folder {path} not found")
    if not path.is_dir():
        raise DataError(f"{path} is a file; pass the folder that holds the dataset")
    if any(path.glob("*_map.txt")):
        return "zip"
    if has_idx_files(path):
        return "idx"
    if find_cifar_dir(path) is not None:
        return "cifar"
    if find_split_dir(path, "train") or find_split_dir(path, "val"):
        return "folder"
    raise DataError(
        f"cannot tell the dataset layout of {path}: expected train/ and val/ image folders, "
        "*_map.txt files with zips, IDX files or CIFAR batches"
    )


def _source(name_or_path: str | os.PathLike, data_path: str | os.PathLike | None) -> _Source:
    text = os.fspath(name_or_path)
    builtin = canonical_name(text)
    if builtin == "digits":
        return _Source("digits", None, "digits")
    if builtin == "fashion-mnist":
        return _Source("idx", Path(data_path or FASHION_MNIST_DIR), "fashion-mnist")
    if builtin in ("cifar10", "cifar100"):
        if data_path is None:
            raise ConfigError(f"{builtin} needs data_path=<folder of the CIFAR python batches>")
        found = find_cifar_dir(Path(data_path))
        if found is None:
            raise DataError(f"no CIFAR batches in {data_path}")
        kind = (
            "cifar10"
            if (found / "data_batch_1").is_file() or (found / "test_batch").is_file()
            else "cifar100"
        )
        if kind != builtin:
            raise DataError(f"{data_path} holds {kind}, not {builtin}")
        return _Source("cifar", found, builtin)
    path = Path(text).expanduser()
    if not path.exists() and os.sep not in text and "." not in text:
        close = difflib.get_close_matches(text.lower(), list(BUILTIN_NAMES), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"unknown dataset {text!r}{hint}: not a built-in name nor an existing folder"
        )
    fmt = _detect(path)
    return _Source(fmt, path, path.resolve().name or str(path))


def _opt(kw: dict[str, Any], name: str, default: Any) -> Any:
    """``kw[name]`` unless it is missing or ``None``."""
    v = kw.get(name)
    return default if v is None else v


def _check_options(kw: dict[str, Any]) -> None:
    unknown = sorted(set(kw) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown dataset option {unknown[0]!r}; known: {', '.join(OPTIONS)}")


def _zip_files(path: Path, split: str) -> tuple[Path, Path]:
    names = ("train",) if split == "train" else ("val", "validation", "test")
    for n in names:
        if (path / f"{n}_map.txt").is_file():
            return path / f"{n}.zip", path / f"{n}_map.txt"
    raise DataError(f"no {names[0]}_map.txt in zipped dataset folder {path}")


def _zip_num_classes(path: Path, kw: dict[str, Any]) -> int:
    if kw.get("num_classes") is not None:
        return int(kw["num_classes"])
    maps = [read_map(p) for p in sorted(path.glob("*_map.txt"))]
    return map_num_classes(*maps)


def _load_tensor(src: _Source, split: str, kw: dict[str, Any]) -> tuple[Any, DatasetInfo]:
    """(images, targets, classes), native info for an in-memory format."""
    if src.fmt == "digits":
        images, targets, mean, std = load_digits_split(split)
        classes = [str(i) for i in range(10)]
        n_cls = 10
    elif src.fmt == "idx":
        s = load_idx_split(src.path, split, kw.get("num_classes"))  # type: ignore[arg-type]
        images, targets, mean, std, classes, n_cls = (
            s.images,
            s.targets,
            s.mean,
            s.std,
            s.classes,
            s.num_classes,
        )
    else:
        c = load_cifar_split(src.path, split, kw.get("label_mode", "fine"))  # type: ignore[arg-type]
        images, targets, mean, std, classes, n_cls = (
            c.images,
            c.targets,
            c.mean,
            c.std,
            c.classes,
            c.num_classes,
        )
        if kw.get("num_classes") is not None and int(kw["num_classes"]) != n_cls:
            raise DataError(f"{c.name} has {n_cls} classes, not num_classes={kw['num_classes']}")
    info = DatasetInfo(
        name=src.name,
        num_classes=n_cls,
        in_chans=int(images.shape[1]),
        img_size=int(images.shape[-1]),
        mean=mean,
        std=std,
        classes=tuple(classes) if classes else None,
    )
    return (images, targets, classes), info


def _file_info(src: _Source, kw: dict[str, Any]) -> DatasetInfo:
    assert src.path is not None
    if src.fmt == "zip":
        return DatasetInfo(
            src.name, _zip_num_classes(src.path, kw), 3, 224, IMAGENET_MEAN, IMAGENET_STD
        )
    folder = find_split_dir(src.path, "train") or find_split_dir(src.path, "val")
    classes = find_classes(folder)  # type: ignore[arg-type]
    if not classes:
        raise DataError(f"image folder {folder} has no class sub-folders")
    n_cls = int(kw["num_classes"]) if kw.get("num_classes") is not None else len(classes)
    if n_cls < len(classes):
        raise DataError(f"{folder} has {len(classes)} class folders but num_classes={n_cls}")
    return DatasetInfo(src.name, n_cls, 3, 224, IMAGENET_MEAN, IMAGENET_STD, tuple(classes))


def _effective(info: DatasetInfo, in_chans: int | None, mean: Any, std: Any) -> DatasetInfo:
    chans = info.in_chans if in_chans is None else int(in_chans)
    if chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 or 3, got {in_chans}")
    m, s = resolve_norm(mean, std, (info.mean, info.std), chans)
    return replace(info, in_chans=chans, mean=m, std=s)


def dataset_info(
    name_or_path: str | os.PathLike,
    *,
    in_chans: int | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    **kw: Any,
) -> DatasetInfo:
    """What a model needs to know about a dataset, without building a split.

    Args:
        name_or_path: built-in name or dataset folder.
        in_chans: channels the model will see (default: the dataset's).
        mean: normalisation mean (numbers, ``"imagenet"``, ``"inception"``, ``"dataset"``).
        std: normalisation std.
        **kw: the options of :func:`build_dataset` (``data_path``, ``num_classes`` ...).

    Returns:
        The summary; ``img_size`` is the native image size (224 for photo folders).

    Raises:
        ConfigError: unknown name or option. DataError: missing or malformed data.

    Example:
        >>> info = dataset_info("fashion-mnist")
        >>> (info.num_classes, info.in_chans, info.img_size)
        (10, 1, 28)
    """
    _check_options(kw)
    src = _source(name_or_path, kw.get("data_path"))
    if src.fmt in _TENSOR_AUG:
        try:
            _, info = _load_tensor(src, "train", kw)
        except DataError:
            _, info = _load_tensor(src, "val", kw)
    else:
        info = _file_info(src, kw)
    return _effective(info, in_chans, mean, std)


def build_dataset(
    name_or_path: str | os.PathLike,
    split: str,
    *,
    img_size: int | None = None,
    train_transform: bool | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    in_chans: int | None = None,
    augment: str = "default",
    **kw: Any,
) -> Dataset:
    """Builds one split of a dataset, with its transform.

    Default augmentations (``augment="default"``): photos get DeiT's random resized crop
    (``scale``, ``ratio``) and a flip; Fashion-MNIST and other IDX data a random crop with
    2 pixels of zero padding and a flip; CIFAR a crop with 4 pixels of padding and a flip; the
    8x8 digits a crop with 1 pixel of padding and no flip. ``augment="rrc"`` gives every dataset
    the random resized crop; ``augment="none"`` the evaluation transform.

    Args:
        name_or_path: built-in name (``fashion-mnist``, ``digits``, ``cifar10``, ``cifar100``) or
            a dataset folder (layout detected).
        split: ``"train"`` or ``"val"`` (aliases ``"test"``, ``"eval"``, ``"validation"``).
        img_size: output side (default: native; 224 for photos).
        train_transform: random augmentation on (default: for the train split).
        mean: normalisation mean: numbers, ``"imagenet"``, ``"inception"`` (0.5, as
            FasterTransformer), ``"dataset"``/``None`` (the dataset's own).
        std: normalisation std, same choices.
        in_chans: output channels (1 or 3; grey images are repeated, RGB turned to luma).
        augment: ``"default"``, ``"rrc"`` or ``"none"``.
        **kw: ``data_path``, ``crop_pct``, ``interpolation``, ``scale``, ``ratio``, ``pad``,
            ``hflip``, ``label_mode``, ``num_classes`` (see :data:`OPTIONS`).

    Returns:
        A dataset of ``(float32 [C, img_size, img_size], label)`` with ``targets``, ``classes``
        and ``info``, indexable by int or :class:`~vitquant.data.keys.SampleKey`.

    Raises:
        ConfigError: unknown name, split or option. DataError: missing or malformed data.

    Example:
        >>> train = build_dataset("fashion-mnist", "train")
        >>> val = build_dataset("fashion-mnist", "val")
    """
    _check_options(kw)
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    split = canonical_split(split)
    train = (split == "train") if train_transform is None else bool(train_transform)
    src = _source(name_or_path, kw.get("data_path"))
    hflip = kw.get("hflip")
    hflip = None if hflip is None else (0.5 if hflip is True else float(hflip))
    common = {k: tuple(kw[k]) for k in ("scale", "ratio") if kw.get(k) is not None}
    if src.fmt in _TENSOR_AUG:
        (images, targets, classes), native = _load_tensor(src, split, kw)
        info = _effective(native, in_chans, mean, std)
        pad, flip = _TENSOR_AUG[src.fmt]
        transform = TensorTransform(
            img_size or native.img_size,
            info.mean,
            info.std,
            in_chans=info.in_chans,
            augment=augment if train else "none",
            pad=int(_opt(kw, "pad", pad)),
            hflip=flip if hflip is None else hflip,
            crop_pct=float(_opt(kw, "crop_pct", 1.0)),
            **common,
        )
        return TensorImageDataset(images, targets, info, transform, classes)
    info = _effective(_file_info(src, kw), in_chans, mean, std)
    transform = PilTrainTransform(
        img_size or info.img_size,
        info.mean,
        info.std,
        in_chans=info.in_chans,
        hflip=0.5 if hflip is None else hflip,
        interpolation=str(_opt(kw, "interpolation", "bicubic")),
        augment="none" if not train or augment == "none" else "rrc",
        crop_pct=float(_opt(kw, "crop_pct", 0.875)),
        **common,
    )
    return _build_files(src, split, transform, info)


def _build_files(
    src: _Source, split: str, transform: PilTrainTransform, info: DatasetInfo
) -> VisionDataset:
    assert src.path is not None
    if src.fmt == "zip":
        zip_path, map_path = _zip_files(src.path, split)
        return ZipImageDataset(zip_path, map_path, transform, info.num_classes, info)
    folder = find_split_dir(src.path, split)
    if folder is None:
        raise DataError(f"no {split} folder in {src.path} (expected {src.path / split})")
    return ImageFolderDataset(folder, transform, list(info.classes or ()) or None, info)

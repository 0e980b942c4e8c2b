"""Zipped ImageNet: ``train.zip``/``val.zip`` plus ``train_map.txt``/``val_map.txt``.

The format documented by the FasterTransformer ViT-quantization example (and by Swin
Transformer's ``--zip`` mode), which stores ImageNet as two zip files instead of 1.3 million small
files. Each map line is ``relative/path<TAB>label``; the members inside the zip sit either at the
top or under one folder named like the zip (``train/n01440764/x.JPEG``). The zip is opened lazily,
once per process, so that ``DataLoader`` workers never share a file handle.
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
from pathlib import Path
from typing import Any

from PIL import Image

from vitquant.data.base import DatasetInfo, Transform, VisionDataset
from vitquant.data.folders import open_image
from vitquant.errors import DataError

__all__ = ["read_map", "map_num_classes", "ZipImageDataset"]


def read_map(path: str | Path, num_classes: int | None = None) -> list[tuple[str, int]]:
    """Parses a map file into ``(member path, label)`` pairs (cached while the file is unchanged).

    Lines are ``path<TAB>label``; a line without a tab is split at its last run of spaces.
    Blank lines are skipped.

    Args:
        path: the map file.
        num_classes: labels must be below this (``None``: only non-negative).

    Raises:
        DataError: missing file, malformed line or label out of range (with file and line number).
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise DataError(f"map file {path} not found") from None
    entries = _parse_map(str(path), st.st_mtime_ns, st.st_size)
    if num_classes is not None:
        for lineno, name, label in entries:
            if label >= num_classes:
                raise DataError(
                    f"{path}:{lineno}: label {label} of {name} is out of range [0, {num_classes})"
                )
    return [(name, label) for _, name, label in entries]


@functools.lru_cache(maxsize=4)
def _parse_map(path: str, mtime_ns: int, size: int) -> tuple[tuple[int, str, int], ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read map file {path}: {exc}") from None
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit("\t", 1) if "\t" in line else line.rsplit(None, 1)
        try:
            name, label = parts[0].strip().lstrip("/"), int(parts[1])
        except (IndexError, ValueError):
            name, label = "", 0
        if not name:
            raise DataError(
                f"{path}:{lineno}: malformed line {line!r}, expected 'relative/path<TAB>label'"
            )
        if label < 0:
            raise DataError(f"{path}:{lineno}: label {label} is out of range (negative): {line!r}")
        entries.append((lineno, name, label))
    if not entries:
        raise DataError(f"map file {path} lists no images")
    return tuple(entries)


def map_num_classes(*maps: list[tuple[str, int]]) -> int:
    """Largest label of the given maps plus one."""
    return max(label for m in maps for _, label in m) + 1


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DataError(f"zip file {path} not found") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not a readable zip file: {exc}") from None


class ZipImageDataset(VisionDataset):
    """The images listed in a map file, read from a zip file.

    Args:
        zip_path: ``train.zip`` or ``val.zip``.
        map_path: the matching map file.
        transform: callable ``(PIL image, generator) -> tensor``; ``None`` returns PIL images.
        num_classes: number of classes; a larger label is an error (default: largest label + 1).
        info: summary (default: RGB, 224, ImageNet statistics).

    Raises:
        DataError: corrupt zip, malformed map line, label out of range, or a listed image that
            the zip does not hold.
    """

    def __init__(
        self,
        zip_path: str | Path,
        map_path: str | Path,
        transform: Transform | None = None,
        num_classes: int | None = None,
        info: DatasetInfo | None = None,
    ) -> None:
        self.zip_path = Path(zip_path)
        self.map_path = Path(map_path)
        entries = read_map(self.map_path, num_classes)
        n_cls = map_num_classes(entries) if num_classes is None else int(num_classes)
        with _open_zip(self.zip_path) as zf:
            names = set(zf.namelist())
        prefix = self._find_prefix(entries, names)
        missing = next((n for n, _ in entries if prefix + n not in names), None)
        if missing is not None:
            raise DataError(f"{self.map_path} lists {missing}, which {self.zip_path} does not hold")
        self.members = [prefix + n for n, _ in entries]
        self.targets = [label for _, label in entries]
        self.classes = None
        self.transform = transform
        if info is None:
            from vitquant.data.transforms import IMAGENET_MEAN, IMAGENET_STD

            info = DatasetInfo(
                self.zip_path.parent.name, n_cls, 3, 224, IMAGENET_MEAN, IMAGENET_STD
            )
        self.info = info
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def _find_prefix(self, entries: list[tuple[str, int]], names: set[str]) -> str:
        first = entries[0][0]
        for prefix in ("", self.zip_path.stem + "/", self.map_path.stem.removesuffix("_map") + "/"):
            if prefix + first in names:
                return prefix
        raise DataError(f"{self.map_path} lists {first}, which {self.zip_path} does not hold")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_zip"], state["_pid"] = None, -1
        return state

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = _open_zip(self.zip_path)
            self._pid = os.getpid()
        return self._zip

    def load_image(self, index: int) -> Image.Image:
        member = self.members[index]
        name = f"{self.zip_path}:{member}"
        try:
            data = self._handle().read(member)
        except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
            raise DataError(f"cannot read {name}: {exc}") from None
        return open_image(io.BytesIO(data), name)

    def close(self) -> None:
        """Closes this process's zip handle (it reopens on the next read)."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None

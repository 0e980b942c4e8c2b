"""Image folders in the ImageNet layout: ``<root>/<split>/<class>/<image>``.

The layout of torchvision's ``ImageFolder`` as DeiT (Touvron et al., 2021, arXiv 2012.12877) and
the FasterTransformer ViT example read ImageNet: one sub-folder per class, classes sorted by
name, labels their position. The images of a split are listed by torchvision's own
``torchvision.datasets.folder.make_dataset`` (recursive, sorted, torchvision's ``IMG_EXTENSIONS``),
so sample ``i`` is the same image as in ``torchvision.datasets.ImageFolder``; torchvision is
imported through :func:`vitquant._optional.import_torchvision` (a clear error when it is missing
or mismatched). What stays here: the split folders, the validation split taking its class list
from the training split (a class missing from ``val/`` does not shift the labels), hidden class
folders (``.ipynb_checkpoints``) skipped, and one-line :class:`~vitquant.errors.DataError`
messages instead of torchvision's ``FileNotFoundError``.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vitquant._optional import import_torchvision
from vitquant.data.base import DatasetInfo, Transform, VisionDataset
from vitquant.errors import DataError

__all__ = [
    "SPLIT_DIRS",
    "find_classes",
    "find_split_dir",
    "list_images",
    "ImageFolderDataset",
    "open_image",
]

SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "test")}


def open_image(source: str | os.PathLike | object, name: str) -> Image.Image:
    """Opens and decodes one image (path or file object); ``name`` is used in errors.

    Raises:
        DataError: the file is missing or not a readable image.
    """
    try:
        with Image.open(source) as img:  # type: ignore[arg-type]
            img.load()
            return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {name}: {exc}") from None


def find_split_dir(root: Path, split: str) -> Path | None:
    """``<root>/train`` for ``"train"``; ``val``, ``validation`` or ``test`` for ``"val"``."""
    for d in SPLIT_DIRS[split]:
        if (root / d).is_dir():
            return root / d
    return None


def find_classes(folder: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``folder`` (hidden folders skipped)."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found")
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def list_images(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """``(path, label)`` of every image under the class folders of ``folder``, torchvision's way.

    Classes of ``class_to_idx`` without a folder (or without images) are allowed: the validation
    split may lack some classes of the training split.

    Raises:
        DataError: there is no image at all (the message lists the extensions looked for).
        MissingDependencyError: torchvision is missing or mismatched.
    """
    import_torchvision()
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        exts = ", ".join(IMG_EXTENSIONS)
        raise DataError(f"image folder {folder} has no images ({exts}) in its class folders")
    return samples


class ImageFolderDataset(VisionDataset):
    """The images of one split folder, labelled by class folder.

    Args:
        folder: the split folder (``<root>/train``).
        transform: callable ``(PIL image, generator) -> tensor``; ``None`` returns PIL images.
        classes: class names to use (default: the sub-folders of ``folder``); a sub-folder that is
            not in the list is an error.
        info: summary (default: made from the classes, RGB, 224, ImageNet statistics).

    Raises:
        DataError: missing folder, no class folders, unknown class, or no images at all.
        MissingDependencyError: torchvision is missing or mismatched (listing the images needs it).
    """

    def __init__(
        self,
        folder: str | Path,
        transform: Transform | None = None,
        classes: list[str] | None = None,
        info: DatasetInfo | None = None,
    ) -> None:
        folder = Path(folder)
        found = find_classes(folder)
        if not found:
            raise DataError(f"image folder {folder} has no class sub-folders")
        if classes is None:
            classes = found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"class folder {folder / unknown[0]} is not a class of the training split"
            )
        index = {c: i for i, c in enumerate(classes)}
        samples = list_images(folder, {c: index[c] for c in found})
        self.folder = folder
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.classes = list(classes)
        self.class_to_idx = index
        self.transform = transform
        if info is None:
            from vitquant.data.transforms import IMAGENET_MEAN, IMAGENET_STD

            info = DatasetInfo(
                folder.parent.name or folder.name,
                len(classes),
                3,
                224,
                IMAGENET_MEAN,
                IMAGENET_STD,
                tuple(classes),
            )
        self.info = info

    def load_image(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        return open_image(path, path)

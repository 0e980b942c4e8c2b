"""Dataset base classes shared by every format, the dataset summary, and fixed subsets.

Every dataset of this package returns ``(image float32 [C, H, W], label int)``, exposes
``targets`` (one label per sample), ``classes`` (names, or ``None`` when the format has none) and
``info`` (:class:`DatasetInfo`), and accepts either an integer index or a
:class:`~vitquant.data.keys.SampleKey` (see that module for why).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vitquant.data.keys import resolve_key
from vitquant.errors import ConfigError, DataError

__all__ = ["DatasetInfo", "VisionDataset", "TensorImageDataset", "Subset", "subset"]

Transform = Callable[[Any, "torch.Generator | None"], Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
        name: short name (``"fashion-mnist"``, ``"cifar10"``, the folder name ...).
        num_classes: number of classes (size of the classifier head).
        in_chans: channels of the images the dataset returns.
        img_size: native side of the images (224 for photo folders, whose sizes vary).
        mean: per-channel mean used for normalisation.
        std: per-channel std used for normalisation.
        classes: class names, when the format stores them.
    """

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None


class VisionDataset(Dataset):
    """Base of the datasets: key handling, labels, transform.

    Subclasses set ``targets``, ``classes``, ``info`` and ``transform`` and implement
    :meth:`load_image` (returning what the transform takes: a PIL image or a uint8 tensor).
    """

    targets: Sequence[int] | Tensor
    classes: list[str] | None
    info: DatasetInfo
    transform: Transform | None

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Any:
        """The raw image at ``index`` (before the transform)."""
        raise NotImplementedError

    def __getitem__(self, key: Any) -> tuple[Any, int]:
        index, gen = resolve_key(key, len(self))
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img, gen)
        return img, int(self.targets[index])


class TensorImageDataset(VisionDataset):
    """Images held in memory as one uint8 tensor ``[N, C, H, W]`` (IDX, CIFAR, digits).

    Args:
        images: uint8 tensor ``[N, C, H, W]``.
        targets: int64 tensor ``[N]``.
        info: summary of the dataset.
        transform: usually a :class:`~vitquant.data.tensor_transforms.TensorTransform`.
        classes: class names, if known.
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        info: DatasetInfo,
        transform: Transform | None = None,
        classes: list[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(
                f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) != len(targets):
            raise DataError(f"{len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = targets.to(torch.int64)
        self.info = info
        self.transform = transform
        self.classes = classes

    def load_image(self, index: int) -> Tensor:
        return self.images[index]


class Subset(Dataset):
    """A fixed selection of the samples of ``dataset`` (keys are passed through, re-indexed).

    Args:
        dataset: the full dataset.
        indices: positions in ``dataset``.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        targets = getattr(dataset, "targets", None)
        if targets is not None:
            self.targets: list[int] | None = [int(targets[i]) for i in self.indices]
        else:
            self.targets = None
        self.classes = getattr(dataset, "classes", None)
        self.info = getattr(dataset, "info", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            index, _ = resolve_key(operator.index(key[0]), len(self))
            return self.dataset[(self.indices[index], *key[1:])]
        index, _ = resolve_key(key, len(self))
        return self.dataset[self.indices[index]]


def subset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """A fixed random subset of ``n`` samples (for calibration and quick runs).

    The choice depends only on ``(len(dataset), n, seed)``; the selected indices are sorted, so the
    subset keeps the dataset's order. ``n >= len(dataset)`` returns the dataset itself.

    Args:
        dataset: the dataset.
        n: number of samples wanted.
        seed: seed of the selection.

    Returns:
        A :class:`Subset` (or ``dataset``).

    Raises:
        ConfigError: ``n`` is not positive.

    Example:
        >>> calib = subset(build_dataset("digits", "train"), 256, seed=0)
    """
    if n <= 0:
        raise ConfigError(f"subset size must be positive, got {n}")
    total = len(dataset)  # type: ignore[arg-type]
    if n >= total:
        return dataset
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(total, generator=gen)[:n].sort().values
    return Subset(dataset, chosen.tolist())

"""Built-in dataset names and the scikit-learn digits.

Names accepted by :func:`vitquant.data.build_dataset`:

* ``fashion-mnist`` (also ``fashion_mnist``, ``fmnist``): the IDX files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``), or ``data_path=``;
* ``digits``: scikit-learn's ``load_digits()`` (UCI optical digits, Alpaydin and Kaynak, 1998):
  1,797 grey 8x8 images, 10 classes, shipped inside the scikit-learn wheel. Split
  deterministically: every fifth image (index divisible by 5) is ``val`` (360 images), the rest
  ``train`` (1,437);
* ``cifar10`` and ``cifar100``: the python batches, at ``data_path=``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from vitquant.data.stats import channel_stats
from vitquant.errors import DataError

__all__ = ["BUILTIN_NAMES", "canonical_name", "load_digits_split", "DIGITS_VAL_EVERY"]

BUILTIN_NAMES = {
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "digits": "digits",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
}
DIGITS_VAL_EVERY = 5


def canonical_name(name: str) -> str | None:
    """The canonical built-in name for ``name`` (case-insensitive), or ``None``."""
    return BUILTIN_NAMES.get(name.strip().lower())


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "the 'digits' dataset needs scikit-learn: pip install scikit-learn"
        ) from None
    d = load_digits()
    # values are counts 0..16 of set pixels in 4x4 blocks: scale to 0..255
    images = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return images[:, None], np.asarray(d.target, dtype=np.int64)


def load_digits_split(split: str) -> tuple[Tensor, Tensor, tuple[float, ...], tuple[float, ...]]:
    """One split of the digits.

    Args:
        split: ``"train"`` or ``"val"``.

    Returns:
        ``(images uint8 [N, 1, 8, 8], targets int64 [N], mean, std)``; the statistics are the
        training split's.
    """
    images, targets = _digits()
    is_val = np.arange(len(images)) % DIGITS_VAL_EVERY == 0
    train_mask = ~is_val
    keep = is_val if split == "val" else train_mask
    mean, std = channel_stats(images[train_mask])
    return torch.from_numpy(images[keep].copy()), torch.from_numpy(targets[keep].copy()), mean, std

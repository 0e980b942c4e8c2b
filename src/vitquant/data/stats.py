"""Exact per-channel pixel statistics of uint8 images, through a 256-bin histogram.

Used to give in-memory datasets (IDX, CIFAR, digits) their own normalisation constants, computed
on the training split. The histogram makes the result exact and needs no float copy of the
images (60k Fashion-MNIST images: about 0.1 s).
"""

from __future__ import annotations

import numpy as np

__all__ = ["channel_stats"]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and (population) std of each channel of uint8 images, as fractions of 255.

    Args:
        images: uint8 array ``[N, C, H, W]``.

    Returns:
        ``(mean, std)``, one float per channel, for pixels scaled to ``[0, 1]``.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(np.ascontiguousarray(images[:, c]).ravel(), minlength=256)
        n = counts.sum()
        mean = float((counts * values).sum() / n)
        var = float((counts * (values - mean) ** 2).sum() / n)
        means.append(mean)
        stds.append(max(var, 0.0) ** 0.5)
    return tuple(means), tuple(stds)

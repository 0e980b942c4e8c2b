"""Sample keys: reproducible per-sample randomness for data augmentation.

A sampler of this package yields :class:`SampleKey` ``(index, seed, epoch, repeat)`` instead of a
bare index. A dataset turns the key into its own ``torch.Generator`` seeded from a 64-bit hash of
the four numbers (the splitmix64 finaliser of Steele, Lea and Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014, applied as a counter-based generator in the spirit
of Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011). The random crop and
flip of a sample therefore depend only on ``(seed, epoch, index, repeat)``: not on the worker
process that loads it, the batch it lands in, the global RNG, or whether the run was resumed in
the middle of the epoch. ``repeat`` tells apart the copies of one image that DeiT's repeated
augmentation puts in the same epoch, so that each copy gets its own augmentation.

A bare ``int`` index still works: the transform then draws from torch's global RNG, as
torchvision datasets do.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch

__all__ = ["SampleKey", "sample_seed", "sample_generator", "resolve_key"]

_MASK64 = (1 << 64) - 1


class SampleKey(NamedTuple):
    """Which sample to load and which random augmentation to give it.

    Attributes:
        index: position in the dataset.
        seed: seed of the run.
        epoch: epoch number.
        repeat: copy number of the image inside the epoch (repeated augmentation), else 0.
    """

    index: int
    seed: int = 0
    epoch: int = 0
    repeat: int = 0


def _mix64(z: int) -> int:
    """splitmix64: one step of the Weyl sequence followed by the finaliser (a 64-bit bijection)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """A 63-bit seed that depends on all four numbers and on nothing else.

    Args:
        seed: seed of the run.
        epoch: epoch number.
        index: dataset index.
        repeat: copy number of the image inside the epoch.

    Returns:
        An integer in ``[0, 2**63)``, usable with ``torch.Generator.manual_seed``.
    """
    h = 0x5EED
    for v in (seed, epoch, index, repeat):
        h = _mix64(h ^ (int(v) & _MASK64))
    return h >> 1


def sample_generator(key: SampleKey) -> torch.Generator:
    """A fresh CPU generator seeded from ``key`` (see :func:`sample_seed`)."""
    return torch.Generator().manual_seed(sample_seed(key.seed, key.epoch, key.index, key.repeat))


def resolve_key(key: Any, length: int) -> tuple[int, torch.Generator | None]:
    """Splits a dataset key into a checked index and the generator of its augmentation.

    Args:
        key: a :class:`SampleKey` (or a tuple of its fields) or an integer index; negative
            indices count from the end.
        length: length of the dataset.

    Returns:
        ``(index, generator)``; the generator is ``None`` for a bare integer (global RNG).

    Raises:
        IndexError: the index is out of range (this also ends ``iter(dataset)``).
        TypeError: the key is neither an integer nor a sample key.
    """
    skey = SampleKey(*(operator.index(v) for v in key)) if isinstance(key, tuple) else None
    index = skey.index if skey is not None else operator.index(key)
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} samples")
    index %= length
    if skey is None:
        return index, None
    return index, sample_generator(skey._replace(index=index))

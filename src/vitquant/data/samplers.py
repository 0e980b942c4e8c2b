"""Samplers whose order depends only on ``(seed, epoch)`` and that can start mid-epoch.

* :class:`DistributedSampler` partitions the (shuffled) indices across ranks exactly as
  ``torch.utils.data.DistributedSampler`` does (same permutation, same padding, same strides),
  and optionally without padding, for evaluation.
* :class:`RASampler` is the repeated-augmentation sampler of DeiT (Touvron et al., 2021, arXiv
  2012.12877; Hoffer et al., "Augment your batch", CVPR 2020; Berman et al., "MultiGrain", 2019):
  every index appears ``num_repeats`` times in a row before the list is strided across ranks, so
  the copies of one image land on different ranks, each with its own augmentation; each rank then
  keeps ``ceil(n / num_replicas)`` samples, so an epoch has the usual length. (DeiT rounds that
  down to a multiple of 256, which leaves nothing of a small dataset; timm's ``RepeatAugSampler``
  has the same option, off by default.) DeiT seeds the permutation with the epoch only; here it
  is ``seed + epoch``, as in torch's sampler.

Both yield :class:`~vitquant.data.keys.SampleKey` ``(index, seed, epoch, repeat)``: the dataset
derives each sample's augmentation from the key, so a run resumed with ``set_epoch(epoch,
start)`` sees exactly the samples, in the same order, with the same augmentation, as the
uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from vitquant.data.keys import SampleKey
from vitquant.errors import ConfigError

__all__ = ["DistributedSampler", "RASampler"]


class _KeySampler(Sampler[SampleKey]):
    def __init__(self, length: int, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        if length <= 0:
            raise ConfigError("cannot sample from an empty dataset")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank {rank} is not in [0, {num_replicas})")
        self.length = int(length)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch, and skips the first ``start`` samples of this rank (resume)."""
        if start < 0:
            raise ConfigError(f"start must be >= 0, got {start}")
        self.epoch = int(epoch)
        self.start = int(start)

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def order(self) -> list[tuple[int, int]]:
        """``(index, repeat)`` of this rank's samples for the current epoch (whole epoch)."""
        raise NotImplementedError

    def num_samples(self) -> int:
        """Samples of this rank in a whole epoch."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[SampleKey]:
        for index, repeat in self.order()[self.start :]:
            yield SampleKey(index, self.seed, self.epoch, repeat)

    def __len__(self) -> int:
        return max(0, self.num_samples() - self.start)


class DistributedSampler(_KeySampler):
    """Each rank's share of a (shuffled) epoch; works with one process too.

    Args:
        length: dataset length.
        num_replicas: number of ranks.
        rank: this rank.
        shuffle: shuffle with ``torch.randperm`` seeded by ``seed + epoch``.
        seed: seed of the run.
        drop_last: drop the tail that does not divide evenly, instead of padding.
        pad: pad (with the first indices again) so that all ranks get the same number of
            samples; ``False`` gives rank ``r`` exactly ``indices[r::num_replicas]`` (evaluation).
    """

    def __init__(
        self,
        length: int,
        num_replicas: int = 1,
        rank: int = 0,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pad: bool = True,
    ) -> None:
        super().__init__(length, num_replicas, rank, shuffle, seed)
        self.drop_last = bool(drop_last)
        self.pad = bool(pad)

    def num_samples(self) -> int:
        n, r = self.length, self.num_replicas
        if self.drop_last and n % r:
            return math.ceil((n - r) / r)
        if self.pad:
            return math.ceil(n / r)
        return len(range(self.rank, n, r))

    def order(self) -> list[tuple[int, int]]:
        perm = self._permutation()
        n, r = self.length, self.num_replicas
        keyed = [(i, 0) for i in perm]
        if self.drop_last and n % r:
            keyed = keyed[: self.num_samples() * r]
        elif self.pad:
            total = math.ceil(n / r) * r
            copy = 1
            while len(keyed) < total:
                keyed += [(i, copy) for i in perm[: total - len(keyed)]]
                copy += 1
        return keyed[self.rank :: r]


class RASampler(_KeySampler):
    """DeiT's repeated-augmentation sampler (see the module docstring).

    Args:
        length: dataset length.
        num_replicas: number of ranks.
        rank: this rank.
        shuffle: shuffle with ``torch.randperm`` seeded by ``seed + epoch``.
        seed: seed of the run.
        num_repeats: copies of each image per epoch (DeiT: 3).
    """

    def __init__(
        self,
        length: int,
        num_replicas: int = 1,
        rank: int = 0,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_repeats: int = 3,
    ) -> None:
        super().__init__(length, num_replicas, rank, shuffle, seed)
        if num_repeats < 1:
            raise ConfigError(f"num_repeats must be >= 1, got {num_repeats}")
        self.num_repeats = int(num_repeats)

    def num_samples(self) -> int:
        return math.ceil(self.length / self.num_replicas)

    def repeated(self) -> list[tuple[int, int]]:
        """The whole repeated, padded list of the epoch, before it is split across ranks."""
        keyed = [(i, k) for i in self._permutation() for k in range(self.num_repeats)]
        total = math.ceil(len(keyed) / self.num_replicas) * self.num_replicas
        pad = [(i, k + self.num_repeats) for i, k in keyed[: total - len(keyed)]]
        return keyed + pad

    def order(self) -> list[tuple[int, int]]:
        return self.repeated()[self.rank :: self.num_replicas][: self.num_samples()]

"""Data loaders: sampler choice, distributed auto-detection, epochs and mid-epoch resume.

:func:`build_loader` wraps a dataset in a ``DataLoader`` driven by the samplers of
:mod:`vitquant.data.samplers` (DeiT's data set-up, Touvron et al., 2021, arXiv 2012.12877:
distributed sampler, optional repeated augmentation). The loader gets its own seeded generator,
so iterating it never touches torch's global RNG, and its worker processes use one thread each.
Call :func:`set_epoch` before every epoch; to resume inside an epoch pass the number of batches
already done.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from vitquant.data.samplers import DistributedSampler, RASampler, _KeySampler
from vitquant.errors import ConfigError

__all__ = ["build_loader", "set_epoch", "world_info"]


def world_info(distributed: bool | None = None) -> tuple[int, int]:
    """``(world_size, rank)``: from ``torch.distributed`` when it is initialised (or asked for).

    Args:
        distributed: ``None`` detects; ``True`` requires an initialised process group;
            ``False`` gives ``(1, 0)``.

    Raises:
        ConfigError: ``distributed=True`` without a process group.
    """
    ready = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = ready
    if not distributed:
        return 1, 0
    if not ready:
        raise ConfigError("distributed=True but torch.distributed is not initialised")
    return dist.get_world_size(), dist.get_rank()


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 0,
    distributed: bool | None = None,
    repeated_aug: int | bool = 0,
    seed: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` whose batches depend only on ``(seed, epoch)``.

    Training shuffles (permutation seeded by ``seed + epoch``) and pads each rank to the same
    length; evaluation keeps the dataset order and does not pad, so with several ranks each rank
    gets ``indices[rank::world]`` and the metrics must be summed across ranks, not averaged.

    Args:
        dataset: a dataset of this package (or any map-style dataset accepting sample keys).
        batch_size: samples per batch and process.
        train: training (shuffle, augmentation keys, drop the last partial batch) or evaluation.
        num_workers: worker processes (0: load in the main process).
        distributed: split across ``torch.distributed`` ranks (``None``: when initialised).
        repeated_aug: copies per image for DeiT's repeated augmentation (0 or 1: off;
            ``True``: 3); training only.
        seed: seed of the order and augmentation.
        drop_last: drop the last partial batch (default: ``train``).
        pin_memory: pin batches for faster host-to-GPU copies.

    Returns:
        The loader; ``loader.sampler`` is a :class:`DistributedSampler` or :class:`RASampler`.

    Raises:
        ConfigError: bad batch size, worker count or repeat count.

    Example:
        >>> loader = build_loader(train_set, 128, train=True, seed=0)
        >>> for epoch in range(10):
        ...     set_epoch(loader, epoch)
        ...     for images, labels in loader: ...
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    repeats = 3 if repeated_aug is True else int(repeated_aug)
    if repeats < 0:
        raise ConfigError(f"repeated_aug must be >= 0, got {repeated_aug}")
    world, rank = world_info(distributed)
    length = len(dataset)  # type: ignore[arg-type]
    sampler: _KeySampler
    if train and repeats > 1:
        sampler = RASampler(length, world, rank, shuffle=True, seed=seed, num_repeats=repeats)
    else:
        sampler = DistributedSampler(length, world, rank, shuffle=train, seed=seed, pad=train)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=train if drop_last is None else bool(drop_last),
        generator=torch.Generator().manual_seed(int(seed)),
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Sets the epoch of the loader's sampler, skipping ``start_batch`` batches (resume).

    Args:
        loader: a loader from :func:`build_loader` (or any loader whose sampler has
            ``set_epoch(epoch)``, then without skipping).
        epoch: epoch number.
        start_batch: batches of this epoch already done; they are skipped without being loaded.

    Raises:
        ConfigError: skipping was asked of a sampler that cannot skip.
    """
    sampler = loader.sampler
    if isinstance(sampler, _KeySampler):
        sampler.set_epoch(epoch, start=int(start_batch) * int(loader.batch_size or 1))
        return
    if start_batch:
        raise ConfigError("only the samplers of vitquant.data can start in the middle of an epoch")
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)

"""Data-parallel set-up for ``torchrun``: process group, device, rank-0 helpers, reductions.

``torchrun --nproc_per_node N -m vitquant train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` then joins the group (gloo on CPU, nccl on CUDA) and
picks the device. Without those variables everything runs in one process and the helpers are
no-ops. Only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vitquant.errors import ConfigError

__all__ = [
    "DistInfo",
    "init_distributed",
    "resolve_device",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "all_gather_objects",
    "broadcast_flag",
    "cleanup",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """True when running with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files)."""
        return self.rank == 0


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` if CUDA is available, else ``cpu``; otherwise ``name``.

    Raises:
        ConfigError: CUDA was asked for but is not available.
    """
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Joins the ``torchrun`` process group if there is one, and picks the device.

    Args:
        device: ``"auto"``, ``"cpu"`` or a CUDA device; under torchrun each process takes
            ``cuda:<LOCAL_RANK>``.

    Returns:
        This process's :class:`DistInfo`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True in the process that writes files (rank 0, or the only process)."""
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    """Waits for all processes (no-op in one process)."""
    if _active():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums a list of numbers over all processes (float64)."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Gathers one object per process, in rank order (``[obj]`` in one process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every process (so that time-based decisions agree)."""
    if not _active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def cleanup() -> None:
    """Leaves the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

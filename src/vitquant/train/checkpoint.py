"""Atomic checkpoints, RNG state capture, and safe loading.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, written with
``torch.save`` to a temporary file in the same folder, flushed to disk and moved over the old file
with ``os.replace``, so a kill at any moment leaves either the old or the new checkpoint, never a
torn one. Loading uses ``torch.load(weights_only=True)``: nothing is unpickled, and a file that
would need unpickling (or is truncated) raises :class:`~vitquant.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitquant._atomic import atomic_write
from vitquant.errors import CheckpointError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "write_json",
]


def _atomic(path: str | os.PathLike[str], write: Any) -> None:
    atomic_write(path, write)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file + ``os.replace``)."""
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Saves a plain ``state`` dict atomically with ``torch.save``."""
    _atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint` (or any plain-tensor ``.pt``).

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, would need unpickling, or is not
            a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for bad files)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} holds pickled objects that would need unpickling; refusing to load it"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({msg[:160]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's CPU and (if present) CUDA generators, as tensors
    and plain lists (loadable with ``weights_only=True``)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`capture_rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["key"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

"""Atomic file writes (temporary file in the same folder + ``os.replace``), used by every writer
of checkpoints, calibrated files, quantized states and exports, so a crash never leaves a
half-written file under the real name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_write", "atomic_torch_save", "atomic_write_json"]


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], sync: bool = True
) -> Path:
    """Calls ``write(f)`` on a temporary binary file, syncs it, then renames it to ``path``.

    ``sync=False`` skips the ``fsync`` (still never a half-written file under ``path``): for many
    small files that can be rewritten, such as soft-label records.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Writes ``obj`` as indented, strict JSON (no NaN), atomically; returns the path."""
    import json

    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))

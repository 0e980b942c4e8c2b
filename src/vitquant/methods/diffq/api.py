"""Restoring, saving and loading DiffQ-style quantized states without the quantizer object.

The state of :meth:`~vitquant.methods.diffq.base.BaseQuantizer.get_quantized_state` names its
method and
the keyword arguments of its quantizer (``meta = {"method": "diffq", "init_kwargs": {...},
"version": 1}``) instead of pickling a class as DiffQ (Défossez et al., 2021, arXiv 2104.09987)
does, so :func:`restore_quantized_state` rebuilds the quantizer from plain data and the file
loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitquant._atomic import atomic_torch_save
from vitquant.errors import CheckpointError, ConfigError
from vitquant.methods.diffq.base import BaseQuantizer
from vitquant.methods.diffq.diffq import DiffQuantizer
from vitquant.methods.diffq.lsq import LSQ
from vitquant.methods.diffq.state import check_state
from vitquant.methods.diffq.uniform import UniformQuantizer

__all__ = [
    "QUANTIZERS",
    "restore_quantized_state",
    "save_quantized_state",
    "load_quantized_state",
    "make_quantizer",
]

#: quantizer classes by the ``method`` name stored in their states
QUANTIZERS: dict[str, type[BaseQuantizer]] = {
    "diffq": DiffQuantizer,
    "uniform": UniformQuantizer,
    "lsq": LSQ,
}


def make_quantizer(model: nn.Module, method: str, **kwargs: Any) -> BaseQuantizer:
    """Builds the quantizer registered as ``method`` (``"diffq"``, ``"uniform"``, ``"lsq"``)."""
    if method not in QUANTIZERS:
        raise CheckpointError(
            f"unknown quantizer method {method!r}: expected one of {', '.join(QUANTIZERS)}"
        )
    return QUANTIZERS[method](model, **kwargs)


def restore_quantized_state(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Writes the quantized weights of ``state`` into ``model`` (in place) and returns it.

    The quantizer is rebuilt from ``state["meta"]``, restored and detached, so ``model`` ends up
    a plain float model holding the dequantized weights, with no hooks or extra parameters.

    Raises:
        CheckpointError: not a vitquant quantized state, or made for another model.
    """
    check_state(state)
    meta = state["meta"]
    kwargs = dict(meta.get("init_kwargs", {}))
    try:
        quantizer = make_quantizer(model, meta.get("method", ""), **kwargs)
    except TypeError as exc:
        raise CheckpointError(f"corrupt quantized state: bad init_kwargs ({exc})") from None
    except ConfigError as exc:
        raise CheckpointError(f"the state does not fit this model: {exc}") from None
    try:
        quantizer.restore_quantized_state(state)
    finally:
        quantizer.detach()
    return model


def save_quantized_state(quantizer: BaseQuantizer, path: str | os.PathLike) -> Path:
    """Saves ``quantizer.get_quantized_state(packed=True)`` to ``path`` atomically."""
    state = quantizer.get_quantized_state(packed=True)
    return atomic_torch_save(state, path)


def load_quantized_state(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a state saved by :func:`save_quantized_state` (``weights_only=True``) and checks it.

    Raises:
        CheckpointError: missing, unreadable or not a vitquant quantized state.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no quantized state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load quantized state {path}: {first}") from None
    check_state(state)
    return state

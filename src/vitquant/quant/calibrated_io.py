"""Saving and loading calibrated (fake-quantized) models.

The file is a ``torch.save`` of plain data only (tensors, str, int, float, bool, lists, dicts), so
it loads with ``torch.load(..., weights_only=True)``: the model's registry name and constructor
arguments, the :class:`QuantConfig` as a dict, and the state dict (quantizer ranges included, with
their format in ``*_extra_state`` entries). Loading rebuilds the model with
:func:`vitquant.create_model` and :func:`prepare`, then loads the state. Files are written
atomically (temporary file, then ``os.replace``), like the seed's ``<model>_calib.pth``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitquant._atomic import atomic_torch_save
from vitquant.errors import CheckpointError, ConfigError
from vitquant.quant.api import get_config, prepare
from vitquant.quant.config import QuantConfig
from vitquant.quant.modules.linear import add_smooth_buffers

__all__ = ["save_calibrated", "load_calibrated", "load_state_checked", "CALIBRATED_FORMAT"]

CALIBRATED_FORMAT = "vitquant-calibrated"
_VERSION = 1


def save_calibrated(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str,
    model_kwargs: dict[str, Any] | None = None,
    config: QuantConfig | None = None,
) -> Path:
    """Writes a calibrated model to ``path`` (atomically) and returns the path.

    Args:
        model: a prepared (and usually calibrated) model.
        path: output file (``.pth``).
        model_name: the name ``vitquant.create_model`` builds the architecture from.
        model_kwargs: its keyword arguments (``num_classes``, ``img_size``, ``in_chans``...); must
            be plain data.
        config: the config the model was prepared with (default: the one ``prepare`` recorded).
    """
    config = config or get_config(model)
    if config is None:
        raise ConfigError("save_calibrated needs a prepared model (or config=...)")
    kwargs = dict(model_kwargs or {})
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise ConfigError(f"model_kwargs must be plain data (JSON-serialisable): {e}") from None
    state = {
        k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()
    }
    payload = {
        "format": CALIBRATED_FORMAT,
        "version": _VERSION,
        "model_name": str(model_name),
        "model_kwargs": kwargs,
        "config": config.to_dict(),
        "state_dict": state,
    }
    return atomic_torch_save(payload, path)


def load_state_checked(model: nn.Module, state: dict[str, Any], source: str = "file") -> None:
    """``model.load_state_dict(state)`` with one-line :class:`CheckpointError`s naming keys and
    shapes. Quantizer range buffers may change shape (per-channel sizes)."""
    add_smooth_buffers(model, state)  # SmoothQuant's per-channel factors, where the file has them
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[:3]}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    range_bufs = (".amax", ".amin", ".scale", ".zero_point")
    for k, v in own.items():
        if not torch.is_tensor(v) or k.endswith(range_bufs):
            continue
        sv = state[k]
        if not torch.is_tensor(sv) or sv.shape != v.shape:
            shape = tuple(sv.shape) if torch.is_tensor(sv) else type(sv).__name__
            raise CheckpointError(
                f"{source} does not match the model: {k} has shape {shape}, model expects "
                f"{tuple(v.shape)}"
            )
    try:
        model.load_state_dict(state)
    except (RuntimeError, ConfigError) as e:
        raise CheckpointError(
            f"{source} does not match the model: {str(e).splitlines()[0]}"
        ) from None


def load_calibrated(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """Rebuilds a model saved by :func:`save_calibrated` (in eval mode, on ``device``).

    Raises:
        CheckpointError: unreadable file, not a calibrated-model file, or a state that does not
            match the rebuilt model (names the keys/shapes).
    """
    from vitquant.models import create_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"calibrated model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CALIBRATED_FORMAT:
        raise CheckpointError(f"{path} is not a vitquant calibrated-model file")
    if int(payload.get("version", 0)) > _VERSION:
        raise CheckpointError(f"{path} has format version {payload['version']}; upgrade vitquant")
    config = QuantConfig.from_dict(payload["config"])
    model = create_model(payload["model_name"], **payload.get("model_kwargs", {}))
    prepare(model, config)
    load_state_checked(model, payload["state_dict"], source=str(path))
    return model.to(device).eval()

"""The resume checks of :func:`~vitquant.train.trainer.fit`: it never silently starts over.

:func:`resume_state` reads an experiment folder's ``last.pt`` (``None`` for a fresh folder) and
refuses a started folder without one, a file of another format (:data:`CHECKPOINT_FORMAT`) and
one written with other (result-changing) options; :func:`state_mismatch` says how a
checkpoint's model state misfits the run's model.
"""

from __future__ import annotations

from typing import Any

import torch

from vitquant.errors import CheckpointError, ConfigError
from vitquant.train.checkpoint import load_checkpoint
from vitquant.train.config import TrainConfig
from vitquant.train.experiment import Experiment

__all__ = ["CHECKPOINT_FORMAT", "resume_state", "state_mismatch"]

CHECKPOINT_FORMAT = "vitquant.train/1"


def resume_state(exp: Experiment, cfg: TrainConfig) -> dict[str, Any] | None:
    """The state to resume from, ``None`` for a fresh folder; never silently starts over.

    Raises:
        CheckpointError: ``last.pt`` is unreadable or not a training checkpoint, or the folder
            shows a started run (``best.pt``, logged epochs) whose ``last.pt`` is gone.
        ConfigError: ``last.pt`` was written with other (result-changing) options.
    """
    if not exp.last_path.exists():
        started = [p.name for p in (exp.best_path, exp.log_path) if p.is_file()]
        if exp.best_path.is_file() or exp.read_log():
            raise CheckpointError(
                f"{exp.root} holds a started run ({', '.join(started)}) but no last.pt to resume "
                "from; move the folder away (or use --name) to start over"
            )
        return None
    state = load_checkpoint(exp.last_path)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{exp.last_path} is not a vitquant training checkpoint")
    stored = state.get("config")
    if isinstance(stored, dict):
        try:
            old = TrainConfig.from_dict(stored)
        except (ConfigError, TypeError) as e:
            msg = str(e).splitlines()[0]
            raise CheckpointError(f"{exp.last_path} holds an unreadable config ({msg})") from None
        diffs = old.differences(cfg)
        if diffs:
            raise ConfigError(
                f"{exp.last_path} was trained with other options: {'; '.join(diffs)} "
                "(use --name or another --output for a new run)"
            )
    return state


def state_mismatch(own: dict[str, Any], saved: Any) -> str | None:
    """How a checkpoint's model state differs from the model's (``None``: it fits)."""
    if not isinstance(saved, dict):
        return "it holds no model state"
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [
        k
        for k in own
        if k in saved
        and torch.is_tensor(saved[k])
        and torch.is_tensor(own[k])
        and saved[k].shape != own[k].shape
    ]
    parts = [
        f"{len(keys)} {what} (first: {keys[0]})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("resized", shapes))
        if keys
    ]
    return ", ".join(parts) + " keys" if parts else None

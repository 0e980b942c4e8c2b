"""Building the student, the fine-tuning start point and the distillation teacher of a run.

A teacher is given (``--teacher``) as a registered model name (its published weights from the
local cache), a vitquant run folder or checkpoint (the architecture is read from the run's
config), or a foreign checkpoint of ``--teacher-model``. DeiT (Touvron et al., 2021) distils from
a teacher that predicts the same classes: another number of classes is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .checkpoint import load_checkpoint
from .config import TrainConfig

__all__ = ["build_student", "load_finetune", "build_teacher", "resolve_run_checkpoint"]


def build_student(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The float model of ``cfg``, initialised from ``cfg.seed``."""
    from ..models import create_model

    torch.manual_seed(cfg.seed)
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans)
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    return create_model(cfg.model, img_size=cfg.img_size, **kwargs)


def resolve_run_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A run folder's ``best.pt`` (or ``last.pt``); a file is returned unchanged.

    Raises:
        CheckpointError: a folder without checkpoints, or a missing file.
    """
    p = Path(path)
    if p.is_dir():
        for name in (f"{which}.pt", "best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p} holds no checkpoint (best.pt / last.pt)")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def _run_model_name(path: Path) -> str | None:
    """The model name stored in a vitquant checkpoint or its run folder, if any."""
    cfg_file = path.parent / "config.yaml"
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        state = {}
    cfg = state.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), str):
        return cfg["model"]
    if cfg_file.is_file():
        import yaml

        data = yaml.safe_load(cfg_file.read_text()) or {}
        return data.get("model")
    return None


def load_finetune(model: nn.Module, path: str, model_name: str) -> None:
    """Loads float weights to start from; a checkpoint of another architecture is an error."""
    from ..models.checkpoints import load_checkpoint as load_weights

    ckpt = resolve_run_checkpoint(path)
    other = _run_model_name(ckpt) if ckpt.suffix in (".pt", ".pth") else None
    if other is not None and other != model_name:
        raise CheckpointError(f"--finetune {path} is a {other} checkpoint, not {model_name}")
    load_weights(model, ckpt)


def build_teacher(
    cfg: TrainConfig, num_classes: int, in_chans: int, device: torch.device
) -> nn.Module | None:
    """The frozen teacher named by ``cfg.teacher`` (``None`` without one), in eval mode.

    Raises:
        ConfigError: unknown name, unknown architecture of a foreign checkpoint, or a teacher
            that predicts another number of classes.
    """
    if not cfg.teacher:
        return None
    from ..models import MODELS, create_model
    from ..models.checkpoints import load_checkpoint as load_weights
    from ..models.checkpoints import load_state_dict

    spec = cfg.teacher
    p = Path(spec)
    if p.exists():
        ckpt = resolve_run_checkpoint(p)
        name = cfg.teacher_model or _run_model_name(ckpt)
        if not name:
            raise ConfigError(
                f"cannot tell the architecture of teacher {spec}; name it with --teacher-model"
            )
        sd = load_state_dict(ckpt)
        head = sd.get("head.weight")
        classes = int(head.shape[0]) if head is not None else num_classes
        chans = sd.get("patch_embed.proj.weight")
        kwargs: dict[str, Any] = dict(num_classes=classes)
        if chans is not None:
            kwargs["in_chans"] = int(chans.shape[1])
        teacher = create_model(name, img_size=cfg.img_size, **kwargs)
        load_weights(teacher, ckpt)
    elif spec in MODELS:
        teacher = create_model(spec, pretrained=True, img_size=cfg.img_size)
    else:
        MODELS.get(spec)  # raises with the closest names
        raise ConfigError(f"unknown teacher {spec!r}")  # pragma: no cover
    classes = getattr(teacher, "num_classes", num_classes)
    if classes != num_classes:
        raise ConfigError(
            f"teacher {spec} predicts {classes} classes but the data has {num_classes}"
        )
    teacher.to(device).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher

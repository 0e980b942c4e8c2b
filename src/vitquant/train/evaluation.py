"""Evaluating a trained model: rebuild it from a run folder or a checkpoint, then top-1/top-5.

A run folder knows everything (``config.yaml``: model, data, method); the method rebuilds the
trained structure (``prepare_model`` with ``resuming=True``; quantization-aware methods get two
small batches of the run's training images to build their quantizers, whose values the
checkpoint then overwrites) before the weights load, and picks the model to evaluate
(``eval_model``). A bare checkpoint needs the model
name; its head must predict the dataset's number of classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitquant.errors import CheckpointError, ConfigError
from vitquant.methods import MethodContext, build_method
from vitquant.train.build import resolve_run_checkpoint
from vitquant.train.checkpoint import load_checkpoint
from vitquant.train.config import TrainConfig
from vitquant.train.data import _data_api, eval_loader
from vitquant.train.distributed import DistInfo, resolve_device
from vitquant.train.engine import evaluate
from vitquant.train.experiment import Experiment

__all__ = ["EvalSpec", "load_model_for_eval", "evaluate_model_on", "structure_batches"]


@dataclass
class EvalSpec:
    """What to evaluate.

    Attributes:
        run_dir: a training run folder (sets every other default), or ``None``.
        model: model name (required without ``run_dir``).
        checkpoint: weights (default for a run: ``best.pt`` or ``last.pt`` per ``which``).
        data_path: dataset (default for a run: its ``data_path``).
        split: split (default for a run: its ``eval_split``, else ``"val"``).
        img_size: resolution (default: the run's / model's).
        which: ``"best"`` or ``"last"`` checkpoint of a run.
        pretrained: load the model's published weights (no checkpoint).
    """

    run_dir: str | None = None
    model: str | None = None
    checkpoint: str | None = None
    data_path: str | None = None
    split: str | None = None
    img_size: int | None = None
    which: str = "best"
    pretrained: bool = False


def _head_classes(state_dict: dict[str, Any]) -> int | None:
    head = state_dict.get("head.weight")
    return int(head.shape[0]) if isinstance(head, torch.Tensor) else None


def load_model_for_eval(
    spec: EvalSpec, num_classes: int, in_chans: int, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """The model to evaluate and a description of it (model, checkpoint, method, run).

    Raises:
        ConfigError: no model name, or a folder that is not a run.
        CheckpointError: unreadable checkpoint, or one of another architecture/class count.
    """
    from vitquant.models import create_model
    from vitquant.models.checkpoints import load_checkpoint as load_weights
    from vitquant.models.checkpoints import load_state_dict

    if spec.run_dir:
        exp = Experiment(spec.run_dir)
        cfg = exp.stored_config()
        if cfg is None:
            raise ConfigError(f"{spec.run_dir} is not a training run folder (no config.yaml)")
        ckpt = Path(spec.checkpoint) if spec.checkpoint else None
        ckpt = ckpt or resolve_run_checkpoint(spec.run_dir, spec.which)
        state = load_checkpoint(ckpt)
        sd = state.get("model")
        if not isinstance(sd, dict):
            raise CheckpointError(f"{ckpt} holds no model state")
        classes = _head_classes(sd)
        if classes is not None and classes != num_classes:
            raise CheckpointError(
                f"{ckpt} predicts {classes} classes but the data has {num_classes}"
            )
        torch.manual_seed(cfg.seed)
        model = create_model(
            cfg.model,
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=spec.img_size or cfg.img_size,
        )
        method = build_method(cfg.method, cfg.method_args)
        ctx = MethodContext(
            config=cfg,
            device=device,
            dist=DistInfo(device=device),
            num_classes=num_classes,
            calib_loader=None if cfg.method == "float" else structure_batches(cfg, model),
            resuming=True,
        )
        model = method.prepare_model(model, ctx)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            msg = str(e).splitlines()[0][:200]
            raise CheckpointError(f"{ckpt} does not fit {cfg.model} ({msg})") from None
        model = method.eval_model(model.to(device))
        desc = {"model": cfg.model, "checkpoint": str(ckpt), "method": cfg.method}
        return model, desc
    if not spec.model:
        raise ConfigError("name the model with --model (or give a run folder)")
    model = create_model(
        spec.model,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=spec.img_size,
        pretrained=spec.pretrained,
    )
    if spec.checkpoint:
        ckpt = resolve_run_checkpoint(spec.checkpoint, spec.which)
        classes = _head_classes(load_state_dict(ckpt))
        if classes is not None and classes != num_classes:
            raise CheckpointError(
                f"{ckpt} predicts {classes} classes but the data has {num_classes}"
            )
        load_weights(model, ckpt)
    elif not spec.pretrained:
        raise ConfigError("give --checkpoint (or --pretrained) to evaluate trained weights")
    desc = {"model": spec.model, "checkpoint": spec.checkpoint, "method": "float"}
    return model.to(device), desc


def structure_batches(
    cfg: TrainConfig, model: nn.Module, n: int = 64, batch: int = 32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` of the run's training images (its seed, no augmentation) in batches of ``batch``:
    what a quantization-aware method needs to build its quantizers before a checkpoint loads."""
    from vitquant.train.data import model_img_size

    data = _data_api()
    full = data.build_dataset(
        cfg.data_path, cfg.train_split, img_size=model_img_size(model), train_transform=False
    )
    ds = data.subset(full, n, seed=cfg.seed)
    pairs = [ds[i] for i in range(len(ds))]
    xs = torch.stack([x for x, _ in pairs])
    ys = torch.as_tensor([int(y) for _, y in pairs])
    return [(xs[i : i + batch], ys[i : i + batch]) for i in range(0, len(xs), batch)]


def resolve_data(spec: EvalSpec) -> tuple[str, str, TrainConfig | None]:
    """``(data_path, split, run config)`` of ``spec`` after run-folder defaults."""
    cfg = Experiment(spec.run_dir).stored_config() if spec.run_dir else None
    data_path = spec.data_path or (cfg.data_path if cfg else None)
    if not data_path:
        raise ConfigError("name the dataset with --data-path")
    split = spec.split or (cfg.eval_split if cfg else "val")
    return data_path, split, cfg


def evaluate_model_on(
    model: nn.Module,
    data_path: str,
    split: str,
    *,
    img_size: int | None = None,
    batch_size: int = 256,
    subset: int = 0,
    seed: int = 0,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> dict[str, float]:
    """Top-1, top-5, loss and image count of ``model`` on a dataset split (one process)."""
    data = _data_api()
    dev = resolve_device(str(device)) if isinstance(device, str) else device
    ds = data.build_dataset(data_path, split, img_size=img_size, train_transform=False)
    if subset:
        ds = data.subset(ds, subset, seed=seed)
    loader = eval_loader(ds, batch_size, num_workers=num_workers)
    return evaluate(model, loader, dev, amp_dtype=torch.bfloat16 if amp else None)

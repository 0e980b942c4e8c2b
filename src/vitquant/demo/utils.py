"""Helpers shared by the demo's steps (:mod:`vitquant.demo`): the float model, evaluation on the
demo's test images, calibration batches, true sizes, the fine-tuning recipe of the QAT and DiffQ
rows, and rebuilding a trained QAT model from its run folder.

No method of its own: the papers are cited where the steps use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitquant.demo.main import DemoContext

__all__ = [
    "float_model",
    "evaluate",
    "calib_batches",
    "true_size",
    "finetune_recipe",
    "load_trained",
    "size_fields",
    "epochs_text",
]


def epochs_text(epochs: int) -> str:
    """``"1 epoch"``, ``"2 epochs"``."""
    return f"{epochs} epoch" + ("" if epochs == 1 else "s")


def float_model(ctx: DemoContext) -> nn.Module:
    """A fresh copy of the float model (``last.pt`` of the float run), in eval mode."""
    from vitquant.models import create_model

    cfg = ctx.artifacts["float_config"]
    ckpt = str(ctx.artifacts["float_checkpoint"])
    return create_model(cfg.model, checkpoint_path=ckpt).eval()


def evaluate(ctx: DemoContext, model: nn.Module) -> dict[str, float]:
    """Top-1/top-5 on the demo's test images (all of them, or the quick mode's subset)."""
    from vitquant.train.evaluation import evaluate_model_on

    n = ctx.config.eval_images()
    return evaluate_model_on(model, ctx.config.data_path, "test", subset=n, device="cpu")


def calib_batches(ctx: DemoContext, n: int = 320, batch: int = 32) -> list[torch.Tensor]:
    """``n`` training images (seed 0, no augmentation) in batches of ``batch``."""
    from vitquant.data import build_dataset, subset

    ds = subset(build_dataset(ctx.config.data_path, "train", train_transform=False), n, seed=0)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    return [xs[i : i + batch] for i in range(0, len(xs), batch)]


def true_size(model: nn.Module) -> float:
    """True size in MiB of a prepared model's packed export (:func:`model_size_report`)."""
    from vitquant.export.io import model_size_report

    return model_size_report(model)["quantized_bytes"] / 2**20


def size_fields(ctx: DemoContext, size_mb: float) -> dict[str, float]:
    """``size_mb`` and ``compression`` (float32 size of the float row / ``size_mb``)."""
    ref = float(ctx.artifacts.get("float_size_mb", 0.0))
    return {"size_mb": size_mb, "compression": ref / size_mb if size_mb > 0 and ref else 0.0}


def finetune_recipe(ctx: DemoContext, train_subset: int, **changes: Any) -> dict[str, Any]:
    """The fine-tuning recipe of the QAT and DiffQ rows (``TrainConfig`` fields).

    One epoch on a training subset, AdamW at 2e-4 with a cosine to 1e-6, no warm-up, weight
    decay or label smoothing, and no augmentation (the float model was trained without; a
    changed input distribution costs about a point on so short a schedule). Evaluates on the
    demo's test images. ``changes`` and then :attr:`DemoConfig.finetune_overrides` override it.
    """
    cfg = ctx.config
    float_cfg = ctx.artifacts["float_config"]
    recipe: dict[str, Any] = dict(
        model=float_cfg.model,
        data_path=cfg.data_path,
        train_split="train",
        eval_split="test",
        eval_subset=cfg.eval_images(),
        train_subset=train_subset,
        epochs=1,
        batch_size=128,
        opt="adamw",
        lr=2e-4,
        min_lr=1e-6,
        warmup_epochs=0.0,
        weight_decay=0.0,
        label_smoothing=0.0,
        clip_grad=1.0,
        augment="none",
        seed=0,
        device=cfg.device,
        num_workers=cfg.num_workers,
    )
    recipe.update(changes)
    recipe.update(cfg.finetune_overrides)
    return recipe


def load_trained(ctx: DemoContext, run_dir: str | Path) -> nn.Module:
    """Rebuilds the model a training run ended with (``last.pt``), in eval mode on the CPU, as
    ``vitquant eval`` does (:func:`vitquant.train.evaluation.load_model_for_eval`)."""
    from vitquant.data import dataset_info
    from vitquant.train.evaluation import EvalSpec, load_model_for_eval

    cfg = ctx.artifacts["float_config"]
    info = dataset_info(cfg.data_path)
    spec = EvalSpec(run_dir=str(run_dir), which="last")
    model, _ = load_model_for_eval(
        spec, int(info.num_classes), int(info.in_chans), torch.device("cpu")
    )
    return model.eval()

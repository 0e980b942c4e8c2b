"""The demo's DiffQ rows: the float model fine-tuned with differentiable pseudo-quantization noise
and a penalty on the model's size, at two penalties (Défossez, Adi and Synnaeve, 2021,
"Differentiable Model Compression via Pseudo Quantization Noise", arXiv 2104.09987).

DiffQ learns a bit width per group of weights (weights only; activations stay float32), so the
row's bits are the average bits per quantized weight and its size is DiffQ's true model size
(packed weights plus the float parameters too small to quantize). Each run goes through
:func:`vitquant.train.fit` with ``method="diffq"`` in an experiment folder under
``<output>/diffq`` named from its options, so a second demo finds it finished.
"""

from __future__ import annotations

import time
from pathlib import Path

from vitquant.demo.main import DemoContext, DemoRow, register_demo_step
from vitquant.demo.utils import epochs_text, finetune_recipe, size_fields

__all__ = ["DIFFQ_PENALTIES", "DIFFQ_GROUP_SIZE", "DIFFQ_TRAIN_IMAGES", "DIFFQ_EPOCHS", "diffq_row"]

#: the two size penalties (loss += penalty x size in MB)
DIFFQ_PENALTIES = (1.0, 10.0)
#: weights sharing one learnt bit width
DIFFQ_GROUP_SIZE = 16
#: Adam learning rate of the bit logits: (normal, quick; few steps need a faster one)
DIFFQ_BITS_LR = (0.03, 0.1)
#: epochs and training images of one DiffQ row: (normal, quick)
DIFFQ_EPOCHS = (2, 1)
DIFFQ_TRAIN_IMAGES = (20000, 3000)


def diffq_row(ctx: DemoContext, penalty: float) -> DemoRow:
    """Fine-tunes the float model with DiffQ at ``penalty`` (or finds the run finished)."""
    from vitquant.train import fit
    from vitquant.train.config import TrainConfig
    from vitquant.train.experiment import Experiment

    k = 1 if ctx.config.quick else 0
    method_args = {"penalty": penalty, "group_size": DIFFQ_GROUP_SIZE, "bits_lr": DIFFQ_BITS_LR[k]}
    recipe = finetune_recipe(ctx, DIFFQ_TRAIN_IMAGES[k], epochs=DIFFQ_EPOCHS[k])
    cfg = TrainConfig(
        **recipe,
        method="diffq",
        method_args=method_args,
        finetune=str(ctx.artifacts["float_checkpoint"]),
        output=str(Path(ctx.config.output) / "diffq"),
    )
    t0 = time.monotonic()
    res = fit(cfg, quiet=not ctx.config.progress)
    cached = res.get("resumed") == "finished"
    last = Experiment(res["experiment"]).read_log()[-1]
    bpw = last.get("bits_per_weight")
    name = f"DiffQ λ={penalty:g}"
    ctx.artifacts[f"run:{name}"] = res["experiment"]
    used = recipe["train_subset"] or "all"
    return DemoRow(
        name,
        float(res["top1"]),
        float(res["top5"]),
        seconds=None if cached else time.monotonic() - t0,
        note=f"group {DIFFQ_GROUP_SIZE}, weights only; "
        f"{epochs_text(recipe['epochs'])} on {used} images" + (", cached" if cached else ""),
        bits=f"~{bpw:.1f}/32" if bpw is not None else "?/32",
        **size_fields(ctx, float(last["model_size_mb"])),
    )


@register_demo_step("diffq-a")
def diffq_a(ctx: DemoContext) -> DemoRow:
    """DiffQ at the lower penalty."""
    return diffq_row(ctx, DIFFQ_PENALTIES[0])


@register_demo_step("diffq-b")
def diffq_b(ctx: DemoContext) -> DemoRow:
    """DiffQ at the higher penalty."""
    return diffq_row(ctx, DIFFQ_PENALTIES[1])

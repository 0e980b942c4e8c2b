"""The demo's quantization-aware training rows, W4A4, each a short fine-tuning of the float model:

* LSQ: learned step sizes (Esser et al., 2020, arXiv 1902.08153), LSQ+ offset after GELU;
* Q-ViT: per-head / per-feature quantizers with learnable zero points, the information
  rectification module and distribution-guided distillation (Li et al., 2022, arXiv 2210.06707).
  Its IRM is vitquant's default form, ``--irm-stats channel`` (a learnable per-channel affine
  with statistics fixed at calibration), not the paper's dynamic re-normalisation
  (``--irm-stats dynamic``); the row's note says so;
* VVTQ: split q/k/v, oscillation tracking and freezing, and multi-crop soft labels (FKD) made by
  the float model (Huang et al., 2024, arXiv 2307.00331); with ``VVTQ_SOFTLABELS = False`` it
  distils from the float teacher instead (DeiT's soft distillation).

Every run goes through :func:`vitquant.methods.qat.run_qat`, in an experiment folder under
``<output>/qat`` named from its options, so a second demo finds it finished and only rebuilds
the model (for its true size and the export row). The trained models stay in
:attr:`DemoContext.artifacts` as ``"model:<row name>"``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from vitquant.demo.main import DemoContext, DemoRow, register_demo_step
from vitquant.demo.utils import epochs_text, finetune_recipe, load_trained, size_fields, true_size

__all__ = [
    "QAT_TRAIN_IMAGES",
    "QVIT_IRM_NOTE",
    "VVTQ_SOFTLABELS",
    "VVTQ_CROPS",
    "VVTQ_TRAIN_IMAGES",
    "add_softlabels",
    "train_images",
    "qat_row",
    "softlabel_folder",
]

#: what the Q-ViT rows' IRM is: the default ``--irm-stats channel``, not the paper's dynamic form
QVIT_IRM_NOTE = "IRM (fixed per-channel stats, --irm-stats channel)"
#: training images of one QAT row: (normal, quick)
QAT_TRAIN_IMAGES = (20000, 3000)
#: Q-ViT's epochs (its per-feature zero points and IRM start further from float): (normal, quick)
QVIT_EPOCHS = (2, 2)
#: Q-ViT's training images: (normal, quick)
QVIT_TRAIN_IMAGES = (20000, 6000)
#: VVTQ learns from multi-crop soft labels (else: soft distillation from the float model)
VVTQ_SOFTLABELS = True
#: recorded crops per image for VVTQ's soft labels (each costs one forward/backward per step)
VVTQ_CROPS = 2
#: training images of the VVTQ row with soft labels (each seen VVTQ_CROPS times): (normal, quick)
VVTQ_TRAIN_IMAGES = (10000, 1500)


def train_images(ctx: DemoContext, sizes: tuple[int, int]) -> int:
    """The ``(normal, quick)`` training-subset size of the demo's mode."""
    return sizes[1] if ctx.config.quick else sizes[0]


def qat_row(
    ctx: DemoContext,
    name: str,
    method: str,
    method_args: dict[str, Any],
    train_images: int,
    note: str,
    **train: Any,
) -> DemoRow:
    """Fine-tunes the float model with ``method`` (or finds the run finished) and makes its row."""
    from vitquant.train.qat_run import run_qat

    recipe = finetune_recipe(ctx, train_images, **train)
    t0 = time.monotonic()
    res = run_qat(
        method,
        str(ctx.artifacts["float_checkpoint"]),
        method_args=method_args,
        output=str(Path(ctx.config.output) / "qat"),
        quiet=not ctx.config.progress,
        **recipe,
    )
    cached = res.get("resumed") == "finished"
    model = load_trained(ctx, res["experiment"])
    ctx.artifacts[f"model:{name}"] = model
    ctx.artifacts[f"run:{name}"] = res["experiment"]
    wbits, abits = method_args.get("wbits", 4), method_args.get("abits", 4)
    n = recipe["train_subset"] or "all"
    return DemoRow(
        name,
        float(res["top1"]),
        float(res["top5"]),
        seconds=None if cached else time.monotonic() - t0,
        note=f"{note}; {epochs_text(recipe['epochs'])} on {n} images"
        + (", cached" if cached else ""),
        bits=f"{wbits}/{abits}",
        **size_fields(ctx, true_size(model)),
    )


@register_demo_step("qat-lsq")
def lsq_row(ctx: DemoContext) -> DemoRow:
    """QAT W4A4 with LSQ (step sizes initialised from the 99.99th percentile)."""
    args = {"wbits": 4, "abits": 4, "init": "percentile"}
    n = train_images(ctx, QAT_TRAIN_IMAGES)
    return qat_row(ctx, "QAT W4A4 LSQ", "lsq", args, n, "LSQ, LSQ+ after GELU")


@register_demo_step("qat-qvit")
def qvit_row(ctx: DemoContext) -> DemoRow:
    """Q-ViT W4A4: IRM (fixed per-channel statistics) and DGD (the float model as the teacher)."""
    args = {"wbits": 4, "abits": 4, "init": "percentile", "irm": True, "dgd": True}
    n = train_images(ctx, QVIT_TRAIN_IMAGES)
    epochs = QVIT_EPOCHS[1] if ctx.config.quick else QVIT_EPOCHS[0]
    return qat_row(ctx, "Q-ViT W4A4", "qvit", args, n, QVIT_IRM_NOTE + " + DGD", epochs=epochs)


def softlabel_folder(ctx: DemoContext, train_images: int) -> str:
    """Makes (once) the float model's soft labels of the VVTQ training subset; its folder."""
    from vitquant.methods.vvtq.softlabels import read_meta
    from vitquant.train.qat_run import make_softlabels

    ckpt = Path(ctx.artifacts["float_checkpoint"])
    key = f"{ckpt.resolve()}|{ckpt.stat().st_mtime_ns}|{train_images}|{VVTQ_CROPS}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = Path(ctx.config.output) / "softlabels" / f"crops{VVTQ_CROPS}_{digest}"
    try:
        read_meta(str(folder))
        return str(folder)
    except Exception:  # noqa: BLE001  (missing or partial: make it again)
        pass
    ctx.say(f"  soft labels of {train_images} images x {VVTQ_CROPS} crops -> {folder}")
    make_softlabels(
        str(ckpt),
        str(folder),
        data_path=ctx.config.data_path,
        train_subset=train_images,
        seed=0,
        num_crops=VVTQ_CROPS,
        topk=5,
        progress=ctx.config.progress,
    )
    return str(folder)


def add_softlabels(ctx: DemoContext, method_args: dict[str, Any]) -> int:
    """Points ``method_args`` at the float model's soft labels of the VVTQ training subset
    (made once); returns that subset's size."""
    n = train_images(ctx, VVTQ_TRAIN_IMAGES)
    n = int(ctx.config.finetune_overrides.get("train_subset", n))
    method_args.update(softlabel_path=softlabel_folder(ctx, n), num_crops=VVTQ_CROPS)
    return n


@register_demo_step("qat-vvtq")
def vvtq_row(ctx: DemoContext) -> DemoRow:
    """VVTQ W4A4: oscillation freezing, with soft labels (or KD from the float model)."""
    args: dict[str, Any] = {"wbits": 4, "abits": 4, "init": "percentile", "freeze": True}
    if VVTQ_SOFTLABELS:
        n = add_softlabels(ctx, args)
        note = f"split q/k/v, freezing, FKD soft labels ({VVTQ_CROPS} crops/image)"
        return qat_row(ctx, "VVTQ W4A4", "vvtq", args, n, note)
    teacher = str(ctx.artifacts["float_checkpoint"])
    return qat_row(
        ctx,
        "VVTQ W4A4",
        "vvtq",
        args,
        train_images(ctx, QAT_TRAIN_IMAGES),
        "split q/k/v, freezing, soft KD from the float model (no FKD soft labels)",
        teacher=teacher,
        distillation_type="soft",
    )

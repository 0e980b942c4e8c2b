"""The demo's 2-bit QAT rows: what each part of Q-ViT and VVTQ adds, against plain LSQ, at W2A2.

Same fine-tuning budget for every row (one epoch on a training subset, AdamW 5e-4; VVTQ sees
each of its images twice, as two recorded crops of the float model's soft labels). Step sizes
start from the MSE fit: the W4A4 rows' 99.99th-percentile start puts nearly every 2-bit weight in
the zero bin, and the model never recovers (10 % top-1).

* LSQ (Esser et al., 2020, arXiv 1902.08153);
* Q-ViT with IRM and DGD, without IRM, without DGD (Li et al., 2022, arXiv 2210.06707); IRM is
  the default fixed-statistics form (``--irm-stats channel``), not the paper's dynamic
  re-normalisation (``--irm-stats dynamic``), as the notes say;
* VVTQ with the bin regulariser (λ = 100: VVTQ's 0.01 does nothing in weight units on this model,
  see ``docs/qat.md``) and oscillation freezing, and without either (Huang et al., 2024,
  arXiv 2307.00331); their notes give the fraction of weights whose integer code reversed
  direction during the epoch.

The longer ablation (4 epochs, W4A4/W3A3/W2A2, every combination) is ``python -m
vitquant.demo.qat_ablation``; its results are in ``docs/qat.md``.
"""

from __future__ import annotations

from typing import Any

from vitquant.demo.main import DemoContext, DemoRow, register_demo_step
from vitquant.demo.qat import QVIT_IRM_NOTE, add_softlabels, qat_row, train_images
from vitquant.train.experiment import Experiment

__all__ = ["ABLATION_TRAIN_IMAGES", "ABLATION_LR", "ABLATION_ROWS", "ablation_rows"]

#: training images of the LSQ and Q-ViT rows: (normal, quick)
ABLATION_TRAIN_IMAGES = (20000, 3000)
#: learning rate of the 2-bit rows (2 bits need the weights to move further than 4 do)
ABLATION_LR = 5e-4
#: row name -> (method, method options, note)
ABLATION_ROWS: dict[str, tuple[str, dict[str, Any], str]] = {
    "LSQ W2A2": ("lsq", {}, "LSQ"),
    "Q-ViT W2A2": ("qvit", {"irm": True, "dgd": True}, f"{QVIT_IRM_NOTE} + DGD"),
    "Q-ViT W2A2 no IRM": ("qvit", {"irm": False, "dgd": True}, "DGD only"),
    "Q-ViT W2A2 no DGD": ("qvit", {"irm": True, "dgd": False}, f"{QVIT_IRM_NOTE} only"),
    "VVTQ W2A2": ("vvtq", {"reg": True, "reg_max": 100.0, "freeze": True}, "reg λ=100 + freezing"),
    "VVTQ W2A2 no reg/freeze": ("vvtq", {"reg": False, "freeze": False}, "neither"),
}


def ablation_rows(ctx: DemoContext) -> list[DemoRow]:
    """Trains (or finds finished) every row of :data:`ABLATION_ROWS`; their table rows."""
    rows = []
    for name, (method, opts, note) in ABLATION_ROWS.items():
        args: dict[str, Any] = {"wbits": 2, "abits": 2, **opts}  # MSE-initialised steps
        if method == "vvtq":
            n = add_softlabels(ctx, args)
            note = f"{note}, FKD soft labels"
        else:
            n = train_images(ctx, ABLATION_TRAIN_IMAGES)
        row = qat_row(ctx, name, method, args, n, note, lr=ABLATION_LR)
        log = Experiment(ctx.artifacts[f"run:{name}"]).read_log()
        last = log[-1] if log else {}
        if "flip_pct" in last:
            row.note += f"; codes flipped in the epoch: {last['flip_pct']:.1f} % of weights"
        rows.append(row)
    return rows


@register_demo_step("qat-2bit")
def qat_2bit_rows(ctx: DemoContext) -> list[DemoRow]:
    """W2A2 rows: LSQ, Q-ViT ± IRM ± DGD, VVTQ ± regulariser and freezing."""
    return ablation_rows(ctx)

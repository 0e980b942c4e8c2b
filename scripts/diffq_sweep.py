"""DiffQ penalty sweep: fine-tune a trained float ViT with several penalties (and the fixed-bit
QAT baseline), then tabulate and plot the true model size against top-1 (Défossez et al., 2021,
arXiv 2104.09987, Fig. 2 style).

Usage (the demo's float model)::

    OMP_NUM_THREADS=1 python scripts/diffq_sweep.py \
        --float "runs/demo/float/exp_augment=none,clip_grad=1,epochs=14,eval_split=test,..." \
        --penalties 1 3 10 30 --group-size 16 --epochs 2 --out runs/diffq_sweep

Each row is one :func:`vitquant.methods.diffq.run_diffq` run under ``--out``, the folder that
``vitquant diffq run -p P -g G --bits-lr L --output OUT -- --config OUT/recipe.yaml`` names:
rerunning the script resumes an interrupted run and skips finished ones. The script writes
``sweep.json`` (after every row), ``sweep.md`` (table + commands) and ``diffq_sweep.png``
(``--png`` to put it elsewhere).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from vitquant.demo.diffq_experiment import run_diffq
from vitquant.train.experiment import Experiment


def float_row(run: Path) -> dict[str, Any]:
    """Top-1 of the float run's last evaluation and its float32 size in MB (parameters)."""
    result = Experiment(run).result()
    if result is None:
        raise SystemExit(f"{run} is not a finished training run (train the float model first)")
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)["model"]
    size = sum(v.numel() * 4 for v in state.values() if v.is_floating_point()) / 2**20
    return {"name": "float32", "top1": result["top1"], "true_size_mb": size, "compression": 1.0}


def table(rows: list[dict[str, Any]], ref_top1: float) -> str:
    """Markdown table of the rows, then the command of each run."""
    lines = [
        "| run | top-1 % | Δ top-1 | true size MB | compression | bits/weight |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        bpw = f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") else ""
        lines.append(
            f"| {r['name']} | {r['top1']:.2f} | {r['top1'] - ref_top1:+.2f} "
            f"| {r['true_size_mb']:.4f} | {r['compression']:.2f}x | {bpw} |"
        )
    cmds = [f"    {r['command']}" for r in rows if r.get("command")]
    return "\n".join(lines) + "\n\nCommands (resume or report each run):\n\n" + "\n".join(cmds)


def plot(rows: list[dict[str, Any]], ref: dict[str, Any], path: Path) -> None:
    """True size (MB) against top-1: DiffQ per penalty, QAT baselines, float32 and 8x lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    diffq = sorted((r for r in rows if "penalty" in r), key=lambda r: r["true_size_mb"])
    ax.plot(
        [r["true_size_mb"] for r in diffq], [r["top1"] for r in diffq], "o-", label="DiffQ g=16"
    )
    for r in diffq:
        ax.annotate(
            f"λ={r['penalty']:g}",
            (r["true_size_mb"], r["top1"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    for r in (r for r in rows if "bits" in r):
        ax.plot(r["true_size_mb"], r["top1"], "s", label=f"QAT {r['bits']} bits")
    ax.axhline(ref["top1"], color="grey", ls="--", lw=1, label=f"float32 ({ref['top1']:.2f}%)")
    ax.axhline(ref["top1"] - 1, color="grey", ls="-.", lw=1, label="float32 - 1 point")
    ax.axvline(ref["true_size_mb"] / 8, color="grey", ls=":", lw=1, label="8x smaller")
    ax.set_xlabel("true model size (MB)")
    ax.set_ylabel("top-1 (%), 10k test images")
    ax.set_title("DiffQ on vit_micro_patch7_28, Fashion-MNIST", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--float", type=Path, required=True, help="finished float run folder")
    p.add_argument("--penalties", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0])
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--bits-lr", type=float, default=3e-2, help="Adam lr of the bit logits")
    p.add_argument("--qat-bits", type=int, nargs="*", default=[4], help="QAT baselines")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4, help="fine-tuning learning rate")
    p.add_argument("--train-subset", type=int, default=0, help="training images (0: all)")
    p.add_argument("--eval-subset", type=int, default=0, help="smoke tests only (0: all)")
    p.add_argument("--out", type=Path, default=Path("runs/diffq_sweep"))
    p.add_argument("--png", type=Path, default=None, help="default: OUT/diffq_sweep.png")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = p.parse_args()

    ref = float_row(args.float)
    common = dict(
        epochs=args.epochs,
        lr=args.lr,
        train_subset=args.train_subset,
        eval_subset=args.eval_subset,
        output=str(args.out),
        device=args.device,
        quiet=args.quiet,
    )
    jobs: list[dict[str, Any]] = [{"bits": b} for b in args.qat_bits or []]
    jobs += [
        {"penalty": pen, "group_size": args.group_size, "bits_lr": args.bits_lr}
        for pen in args.penalties
    ]
    rows: list[dict[str, Any]] = []
    for job in jobs:
        rows.append(run_diffq(args.float, **common, **job))
        print(f"{rows[-1]['name']}: top-1 {rows[-1]['top1']:.2f}, x{rows[-1]['compression']:.2f}")
        (args.out / "sweep.json").write_text(json.dumps({"float": ref, "rows": rows}, indent=2))
    text = table([ref, *rows], ref["top1"])
    (args.out / "sweep.md").write_text(text + "\n")
    print(text)
    png = args.png or args.out / "diffq_sweep.png"
    plot(rows, ref, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()

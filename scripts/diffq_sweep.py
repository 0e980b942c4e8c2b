"""DiffQ penalty sweep: fine-tune a trained float ViT with several penalties, then tabulate and
plot true model size against top-1 (Défossez et al., 2021, arXiv 2104.09987, Fig. 2 style).

Usage (after the demo's float model exists, e.g. ``vitquant demo`` -> ``runs/demo/float``)::

    PYTHONPATH=src python scripts/diffq_sweep.py --float runs/demo/float \
        --penalties 0.3 1 3 10 --epochs 3 --out runs/diffq_sweep

Each penalty is one resumable ``vitquant train --method diffq`` run under ``--out`` (rerunning
the script skips finished ones); ``--qat-bits 4`` adds the QAT baseline. The script writes
``sweep.json``, ``sweep.md`` (a table with the compression over float32 and the top-1 change)
and ``diffq_sweep.png`` (needs matplotlib) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vitquant.train import fit
from vitquant.train.config import TrainConfig
from vitquant.train.experiment import Experiment


def _float_row(run: Path) -> dict[str, Any]:
    exp = Experiment(run)
    result, cfg = exp.result(), exp.stored_config()
    if result is None or cfg is None:
        sys.exit(f"{run} is not a finished training run (train the float model first)")
    import torch

    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)["model"]
    size = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    return {"name": "float32", "top1": result["top1"], "size_mb": size, "cfg": cfg}


def _run(base: TrainConfig, out: Path, name: str, args: argparse.Namespace, method_args: dict):
    cfg = base.replace(
        method="diffq",
        method_args=method_args,
        finetune=str(args.float),
        epochs=args.epochs,
        lr=args.lr,
        warmup_epochs=0.0,
        output=str(out),
        name=name,
        device=args.device,
        num_workers=args.num_workers,
    )
    result = fit(cfg)
    last = Experiment(result["experiment"]).read_log()[-1]
    return {
        "name": name,
        "top1": result["top1"],
        "size_mb": last["model_size_mb"],
        "bits_per_weight": last.get("bits_per_weight"),
        **method_args,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--float", type=Path, required=True, help="finished float run folder")
    p.add_argument("--penalties", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0])
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--bits-lr", type=float, default=1e-2)
    p.add_argument("--qat-bits", type=int, nargs="*", default=[4], help="QAT baselines")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-4, help="fine-tuning learning rate")
    p.add_argument("--out", type=Path, default=Path("runs/diffq_sweep"))
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    args = p.parse_args()

    ref = _float_row(args.float)
    base: TrainConfig = ref.pop("cfg")
    rows = [ref]
    for bits in args.qat_bits or []:
        rows.append(_run(base, args.out, f"exp_bits={bits}", args, {"bits": bits}))
    for pen in args.penalties:
        method_args = {"penalty": pen, "group_size": args.group_size, "bits_lr": args.bits_lr}
        name = f"exp_group_size={args.group_size},penalty={pen:g}"
        rows.append(_run(base, args.out, name, args, method_args))
    for r in rows:
        r["compression"] = ref["size_mb"] / r["size_mb"]
        r["delta_top1"] = r["top1"] - ref["top1"]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| run | top-1 % | Δ top-1 | size MB | compression | bits/weight |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        bpw = f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") else ""
        lines.append(
            f"| {r['name']} | {r['top1']:.2f} | {r['delta_top1']:+.2f} | {r['size_mb']:.4f} "
            f"| {r['compression']:.1f}x | {bpw} |"
        )
    table = "\n".join(lines)
    (args.out / "sweep.md").write_text(table + "\n")
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    diffq = [r for r in rows if "penalty" in r]
    ax.plot([r["size_mb"] for r in diffq], [r["top1"] for r in diffq], "o-", label="DiffQ")
    for r in diffq:
        ax.annotate(f"λ={r['penalty']:g}", (r["size_mb"], r["top1"]), fontsize=8)
    qat = [r for r in rows if "bits" in r]
    if qat:
        ax.plot([r["size_mb"] for r in qat], [r["top1"] for r in qat], "s", label="QAT")
    ax.axhline(ref["top1"], color="grey", ls="--", label="float32")
    ax.axvline(ref["size_mb"] / 8, color="grey", ls=":", label="8x smaller")
    ax.set_xlabel("true model size (MB)")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "diffq_sweep.png", dpi=120)
    print(f"wrote {args.out / 'diffq_sweep.png'}")


if __name__ == "__main__":
    main()

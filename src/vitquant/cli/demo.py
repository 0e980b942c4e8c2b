"""``vitquant demo``: the end-to-end demo on Fashion-MNIST (``make demo``), as a results table.

The work is in :mod:`vitquant.demo` (steps) and :mod:`vitquant.demo.report` (files); this module
only parses flags, prints the table and writes ``results.json``, ``results.md`` and
``accuracy_vs_size.png``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Adds the ``demo`` sub-command."""
    from vitquant.demo import DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="train a small ViT on Fashion-MNIST, quantize it every way, print the results table",
        description="The end-to-end demo: float training, PTQ, QAT (LSQ, Q-ViT, VVTQ), DiffQ, "
        "export and the int8 runtime, one row each. Training runs are cached under --output, "
        "so a second run takes about a minute.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the < 5 minute version: short float training, small subsets, 2000 test images",
    )
    p.add_argument("--data-path", default=d.data_path, help=f"default {d.data_path}")
    p.add_argument("--output", default=d.output, help=f"runs folder (default {d.output})")
    p.add_argument(
        "--out", default=None, help="folder of results.json/.md and the PNG (default: --output)"
    )
    p.add_argument("--device", default=d.device)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--steps", nargs="+", default=None, help="run only these steps")
    p.add_argument(
        "--min-top1", type=float, default=None, help="exit 1 if the float top-1 is lower"
    )


def run(args: argparse.Namespace) -> int:
    """Runs the demo, prints the table and writes the result files."""
    from vitquant.demo import DemoConfig, format_table, run_demo_report
    from vitquant.demo.report import write_report

    cfg = DemoConfig(
        data_path=args.data_path,
        output=args.output,
        out=args.out,
        quick=args.quick,
        device=args.device,
        num_workers=args.num_workers,
        steps=args.steps,
    )
    report = run_demo_report(cfg)
    rows = report.rows
    print()
    print(format_table(rows))
    written = write_report(report, cfg.results_dir())
    print()
    for kind in ("json", "md", "png"):
        if kind in written:
            print(f"wrote {written[kind]}")
    if "png" not in written:
        print("matplotlib is not installed: no accuracy_vs_size.png (pip install matplotlib)")
    print(f"total {report.seconds / 60:.1f} min")
    if args.min_top1 is not None and rows and rows[0].top1 < args.min_top1:
        print(f"float top-1 {rows[0].top1:.2f}% is below {args.min_top1:.2f}%")
        return 1
    return 0

"""``vitquant demo``: the end-to-end demo on Fashion-MNIST (``make demo``), as a results table.

The work is in :mod:`vitquant.demo`; this module only parses flags and prints the table.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Adds the ``demo`` sub-command."""
    from ..demo import DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="train a small ViT on Fashion-MNIST and print the results table",
        description="The end-to-end demo: float training (cached in runs/demo) and the rows "
        "registered after it.",
    )
    p.add_argument("--quick", action="store_true", help="the < 5 minute version")
    p.add_argument("--data-path", default=d.data_path, help=f"default {d.data_path}")
    p.add_argument("--output", default=d.output, help=f"default {d.output}")
    p.add_argument("--device", default=d.device)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--steps", nargs="+", default=None, help="run only these steps")
    p.add_argument(
        "--min-top1", type=float, default=None, help="exit 1 if the float top-1 is lower"
    )


def run(args: argparse.Namespace) -> int:
    """Runs the demo and prints the table."""
    from ..demo import DemoConfig, format_table, run_demo

    cfg = DemoConfig(
        data_path=args.data_path,
        output=args.output,
        quick=args.quick,
        device=args.device,
        num_workers=args.num_workers,
        steps=args.steps,
    )
    rows = run_demo(cfg)
    print()
    print(format_table(rows))
    if args.min_top1 is not None and rows and rows[0].top1 < args.min_top1:
        print(f"float top-1 {rows[0].top1:.2f}% is below {args.min_top1:.2f}%")
        return 1
    return 0

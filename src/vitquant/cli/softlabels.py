"""``vitquant softlabels``: write an FKD soft-label folder from any teacher.

Runs the teacher on ``--num-crops`` random-resized crops of every training image and stores, per
image, the crop coordinates, the flip flag and the top-k soft labels (FKD, Shen & Xing, 2022;
the format VVTQ trains from, see :mod:`vitquant.methods.vvtq.softlabels`). Train with
``vitquant train --method vvtq --softlabel-path FOLDER --num-crops 4``, using the same
``--train-subset`` and ``--seed``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from vitquant.cli._common import add_config_arg, default_data_path

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Adds the ``softlabels`` sub-command."""
    p = subparsers.add_parser(
        "softlabels",
        help="write multi-crop soft labels (FKD format) from a teacher",
        description="Write an FKD soft-label folder (crops, flips, top-k teacher labels).",
    )
    add_config_arg(p)
    p.add_argument("--teacher", required=True, help="model name, run folder or checkpoint")
    p.add_argument("--teacher-model", default=None, help="architecture of a foreign checkpoint")
    p.add_argument("--data-path", default=default_data_path(), help="dataset name or folder")
    p.add_argument("--split", default="train")
    p.add_argument("--train-subset", type=int, default=0, help="label only this many (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and the crops")
    p.add_argument("--num-crops", type=int, default=10, help="crops recorded per image")
    p.add_argument("--topk", type=int, default=5, help="soft labels kept per crop")
    p.add_argument("--img-size", type=int, default=None, help="crop size (default: teacher's)")
    p.add_argument(
        "--scale", type=float, nargs=2, default=[0.35, 1.0], help="area range of the crops"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", required=True, help="soft-label folder to write")


def run(args: argparse.Namespace) -> int:
    """Writes the folder and prints its metadata."""
    from vitquant.train.qat_run import make_softlabels

    meta = make_softlabels(
        args.teacher,
        args.output,
        data_path=args.data_path,
        split=args.split,
        teacher_model=args.teacher_model,
        train_subset=args.train_subset,
        seed=args.seed,
        num_crops=args.num_crops,
        topk=args.topk,
        img_size=args.img_size,
        scale=(float(args.scale[0]), float(args.scale[1])),
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
    )
    print(json.dumps(meta, indent=1, sort_keys=True))
    return 0

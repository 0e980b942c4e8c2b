"""``vitquant convert SRC DST.safetensors``: rewrite any supported checkpoint as safetensors.

Google ``.npz`` arrays get timm's names; ``model``/``state_dict`` wrappers and ``module.`` prefixes
are removed. A ``.pth`` that pickles Python objects is refused unless ``--unsafe-trust-file`` says
the file is trusted (it is then read with ``weights_only=False``, which can run code).
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Adds the ``convert`` sub-command."""
    p = subparsers.add_parser(
        "convert",
        help="rewrite a checkpoint (.pth/.npz/.safetensors) as safetensors",
        description=__doc__,
    )
    p.add_argument("src", help="input checkpoint: .pth, .npz or .safetensors")
    p.add_argument("dst", help="output file, ending in .safetensors")
    p.add_argument(
        "--unsafe-trust-file",
        action="store_true",
        help="UNSAFE: unpickle a trusted .pth that stores Python objects (runs its code)",
    )


def run(args: argparse.Namespace) -> int:
    """Converts and prints the output path and tensor count."""
    from safetensors import safe_open

    from vitquant.models.checkpoints import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, unsafe_trust_file=args.unsafe_trust_file)
    with safe_open(str(out), framework="pt") as f:
        n = len(list(f.keys()))
    print(f"wrote {out} ({n} tensors)")
    return 0

"""``python -m vitquant.lm --data WIKITEXT_DIR [-p PENALTY -g GROUP | -b BITS [--lsq]]``.

Trains the DiffQ language-model example (Défossez et al., 2021, arXiv 2104.09987) and prints a
validation line per epoch with perplexity and model size, then the test perplexity.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vitquant.errors import VitquantError
from vitquant.lm.train import LMTrainConfig, train_lm
from vitquant.methods.diffq.method import DiffQMethodConfig


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv``, trains, returns the exit code (2 on a user error)."""
    p = argparse.ArgumentParser(prog="python -m vitquant.lm", description=__doc__)
    p.add_argument("--data", required=True, help="folder with wiki.{train,valid,test}.tokens")
    p.add_argument("--out", default=None, help="folder for history, report and quantized state")
    p.add_argument("--float", action="store_true", help="train without quantization")
    p.add_argument("-p", "--penalty", type=float, default=0.0, help="DiffQ size penalty")
    p.add_argument("-g", "--group-size", type=int, default=16, help="DiffQ group size")
    p.add_argument("-b", "--bits", type=int, default=0, help="QAT bits (LSQ with --lsq)")
    p.add_argument("--lsq", action="store_true")
    p.add_argument("--min-bits", type=float, default=2.0)
    p.add_argument("--init-bits", type=float, default=8.0)
    p.add_argument("--min-size", type=float, default=0.01, help="MB")
    p.add_argument("--bits-lr", type=float, default=1e-3)
    d = LMTrainConfig(data="")
    for name in ("dim", "depth", "heads", "seq_len", "max_vocab", "epochs", "batch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--max-steps-per-epoch", type=int, default=0)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        quant = DiffQMethodConfig(
            penalty=args.penalty,
            group_size=args.group_size,
            bits=args.bits,
            lsq=args.lsq,
            min_bits=args.min_bits,
            init_bits=args.init_bits,
            min_size=args.min_size,
            bits_lr=args.bits_lr,
        )
        quant.mode()
        cfg = LMTrainConfig(
            data=args.data,
            out=args.out,
            method="float" if args.float else "diffq",
            quant=quant,
            dim=args.dim,
            depth=args.depth,
            heads=args.heads,
            seq_len=args.seq_len,
            max_vocab=args.max_vocab,
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_steps_per_epoch=args.max_steps_per_epoch,
            lr=args.lr,
            dropout=args.dropout,
            seed=args.seed,
            device=args.device,
        )
        train_lm(cfg)
    except VitquantError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``vitquant eval``: top-1, top-5 and loss of a trained model, printed and written as JSON.

``vitquant eval RUN_DIR`` evaluates a training run (model, data and method from its
``config.yaml``; ``best.pt`` unless ``--which last``) and writes ``RUN_DIR/eval.json``;
``vitquant eval --model NAME --checkpoint F --data-path P`` evaluates any checkpoint.
``--quantized CALIB`` evaluates a calibrated (PTQ) model from ``vitquant calibrate``, and ``--int8``
lowers the model to the real int8 kernels first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vitquant.cli._common import add_config_arg

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Adds the ``eval`` sub-command."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a run folder or a checkpoint (top-1, top-5, loss)",
        description="Evaluate a training run folder, or --model with --checkpoint.",
    )
    add_config_arg(p)
    p.add_argument("run_dir", nargs="?", default=None, help="a training run folder")
    p.add_argument("--model", default=None, help="model name (without a run folder)")
    p.add_argument("--checkpoint", default=None, help="weights (.pt/.pth/.npz/.safetensors)")
    p.add_argument("--pretrained", action="store_true", help="the model's published weights")
    p.add_argument("--which", choices=("best", "last"), default="best", help="run checkpoint")
    p.add_argument("--data-path", default=None, help="dataset (default: the run's)")
    p.add_argument("--split", default=None, help="split (default: the run's eval split / val)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--subset",
        type=int,
        default=None,
        help="evaluate this many images (0: all; default: the run's eval subset)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of --subset (default: the run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--quantized", metavar="CALIB", default=None, help="calibrated model file")
    p.add_argument("--int8", action="store_true", help="lower to int8 kernels first")
    p.add_argument("--output", default=None, help="JSON file (default: RUN_DIR/eval.json)")


def _load_calibrated(path: str, device: Any) -> Any:
    from vitquant.errors import ConfigError

    try:
        from vitquant.quant import load_calibrated  # type: ignore[attr-defined]
    except ImportError:
        raise ConfigError(
            "--quantized needs vitquant.quant.load_calibrated, which this version lacks"
        ) from None
    return load_calibrated(path, device=device)


def _lower(model: Any) -> Any:
    from vitquant.errors import ConfigError

    try:
        from vitquant.runtime import lower  # type: ignore[attr-defined]
    except ImportError:
        raise ConfigError("--int8 needs vitquant.runtime.lower, which this version lacks") from None
    return lower(model)


def run(args: argparse.Namespace) -> int:
    """Evaluates, prints one line, writes the JSON."""
    from vitquant.cli._common import print_metrics
    from vitquant.errors import CheckpointError, ConfigError
    from vitquant.train.checkpoint import write_json
    from vitquant.train.data import dataset_meta, model_img_size
    from vitquant.train.distributed import resolve_device
    from vitquant.train.evaluation import (
        EvalSpec,
        evaluate_model_on,
        load_model_for_eval,
        resolve_data,
    )

    if args.run_dir and not Path(args.run_dir).is_dir():
        raise ConfigError(f"run folder not found: {args.run_dir}")
    spec = EvalSpec(
        run_dir=args.run_dir,
        model=args.model,
        checkpoint=args.checkpoint,
        data_path=args.data_path,
        split=args.split,
        img_size=args.img_size,
        which=args.which,
        pretrained=args.pretrained,
    )
    device = resolve_device(args.device)
    data_path, split, cfg = resolve_data(spec)
    num_classes, in_chans = dataset_meta(data_path)
    if args.quantized:
        model = _load_calibrated(args.quantized, device)
        classes = getattr(model, "num_classes", num_classes)
        if classes != num_classes:
            raise CheckpointError(
                f"{args.quantized} predicts {classes} classes but the data has {num_classes}"
            )
        name = (getattr(model, "default_cfg", None) or {}).get("architecture", "quantized")
        desc = {"model": name, "checkpoint": args.quantized, "method": "calibrated"}
    else:
        model, desc = load_model_for_eval(spec, num_classes, in_chans, device)
    size = args.img_size or (cfg.img_size if cfg else None) or model_img_size(model)
    if args.int8:
        model = _lower(model)
        desc["int8"] = True
    metrics = evaluate_model_on(
        model,
        data_path,
        split,
        img_size=size,
        batch_size=args.batch_size,
        subset=args.subset if args.subset is not None else (cfg.eval_subset if cfg else 0),
        seed=args.seed if args.seed is not None else (cfg.seed if cfg else 0),
        num_workers=args.num_workers,
        device=device,
        amp=args.amp,
    )
    result = {**metrics, **desc, "data_path": data_path, "split": split}
    print_metrics(metrics, f"{desc['model']} on {Path(str(data_path)).name}/{split}:")
    out = args.output or (str(Path(args.run_dir) / "eval.json") if args.run_dir else None)
    if out:
        write_json(out, result)
        print(f"wrote {out}")
    else:
        print(json.dumps(result, sort_keys=True))
    return 0

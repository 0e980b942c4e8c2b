"""``vitquant diffq``: DiffQ experiments the way DiffQ's fairseq example runs them.

Défossez et al. (2021, arXiv 2104.09987) drive their WikiText-103 runs with ``run.py`` and
``eval.sh``; this verb offers the same front end over ``vitquant train --method diffq``:

* ``vitquant diffq run -b 4`` (QAT baseline), ``-p 1 -g 16`` (DiffQ), ``-b 4 --lsq`` (LSQ),
  ``-d`` (data-parallel through ``torchrun``); the experiment folder is
  ``<output>/<model>/<dataset>/exp_bits=4`` or ``.../exp_group_size=16,penalty=1`` (named from
  the DiffQ options given, plus ``--label``), and rerunning the command resumes it. Other
  ``vitquant train`` options go after ``--``.
* ``vitquant diffq log EXP``: one validation line per epoch with the model size (the seed's
  ``grep "'valid' subset"``).
* ``vitquant diffq eval EXP [minmax|minmax_pc|histogram]``: evaluates the truly quantized model,
  optionally with 8-bit activation quantization calibrated on 50 training batches.
* ``vitquant diffq export EXP``: writes the packed quantized state ``EXP/quantized.th``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]

#: short flags of the seed's run.py -> option names of the diffq method
_OPTIONS = (
    ("-p", "--penalty", float, "DiffQ: weight of the model size (MB) in the loss"),
    ("-g", "--group-size", int, "DiffQ: weights sharing a bit width"),
    ("-b", "--bits", int, "fixed bits: QAT baseline (LSQ with --lsq)"),
    (None, "--min-bits", float, "DiffQ: lowest bit width"),
    (None, "--max-bits", float, "DiffQ: highest bit width"),
    (None, "--init-bits", float, "DiffQ: initial bit width"),
    (None, "--min-size", float, "parameters of at most this many MB stay in float"),
    (None, "--bits-lr", float, "DiffQ: learning rate of the bit logits"),
)


def add_parser(subparsers: Any) -> None:
    """Adds the ``diffq`` sub-command and its ``run``/``log``/``eval``/``export`` actions."""
    p = subparsers.add_parser(
        "diffq",
        help="DiffQ experiments as the seed's run.py/eval.sh (run, log, eval, export)",
        description="DiffQ experiments with the seed's fairseq front end.",
    )
    sub = p.add_subparsers(dest="action", metavar="<action>")
    sub.required = True

    r = sub.add_parser("run", help="train (or resume) an experiment: -p/-g DiffQ, -b QAT")
    for short, long, typ, help_ in _OPTIONS:
        flags = [f for f in (short, long) if f]
        r.add_argument(*flags, type=typ, default=None, help=help_)
    r.add_argument("--lsq", action="store_true", help="LSQ instead of min-max QAT (with -b)")
    r.add_argument("--exclude", nargs="+", default=None, help="parameters kept in float")
    r.add_argument("--float16", action="store_true", help="store float parameters in float16")
    r.add_argument("-d", "--distributed", action="store_true", help="train with torchrun")
    r.add_argument("--nproc", type=int, default=2, help="processes with -d (default 2)")
    r.add_argument("--label", default=None, help="appended to the experiment name")
    r.add_argument("--model", default=None, help="model (default: vitquant train's)")
    r.add_argument("--data-path", default=None, help="dataset (default: vitquant train's)")
    r.add_argument("--epochs", type=int, default=None)
    r.add_argument("--finetune", default=None, help="float checkpoint or run folder")
    r.add_argument("--output", default="runs", help="root of the experiment folders")
    r.add_argument("--dry-run", action="store_true", help="print the train command only")
    r.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then vitquant train options")

    lg = sub.add_parser("log", help="per-epoch validation lines with the model size")
    lg.add_argument("experiment", help="experiment folder")

    ev = sub.add_parser("eval", help="evaluate the quantized model (optionally activations)")
    ev.add_argument("experiment", help="experiment folder")
    ev.add_argument("act", nargs="?", default=None, choices=("minmax", "minmax_pc", "histogram"))
    ev.add_argument("--act", dest="act_flag", default=None, help="same as the positional")
    ev.add_argument("--act-samples", type=int, default=50, help="calibration batches")
    ev.add_argument("--act-bits", type=int, default=8)
    ev.add_argument("--which", choices=("best", "last"), default="last")
    ev.add_argument("--split", default=None, help="split (default: the run's eval split)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--subset", type=int, default=0, help="evaluate this many images (0: all)")
    ev.add_argument("--device", default="auto")

    ex = sub.add_parser("export", help="write the packed quantized state EXP/quantized.th")
    ex.add_argument("experiment", help="experiment folder")
    ex.add_argument("--which", choices=("best", "last"), default="last")
    ex.add_argument("-o", "--out", default=None, help="output file")


def _method_values(args: argparse.Namespace) -> dict[str, Any]:
    values = {}
    for _, long, _, _ in _OPTIONS:
        key = long[2:].replace("-", "_")
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.lsq:
        values["lsq"] = True
    if args.exclude:
        values["exclude"] = list(args.exclude)
    if args.float16:
        values["float16"] = True
    return values


def train_argv(args: argparse.Namespace) -> list[str]:
    """The ``vitquant train`` arguments of a ``diffq run``."""
    values = _method_values(args)
    argv = ["train", "--method", "diffq", "--output", args.output]
    from vitquant.demo.diffq_experiment import experiment_label

    argv += ["--name", experiment_label(values, args.label)]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    for key in ("model", "data_path", "epochs", "finetune"):
        if getattr(args, key) is not None:
            argv += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    rest = list(args.train_args or [])
    if rest and rest[0] == "--":
        rest = rest[1:]
    return argv + rest


def _run_action(args: argparse.Namespace) -> int:
    argv = train_argv(args)
    if args.distributed:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(args.nproc), "-m", "vitquant", *argv]
    else:
        cmd = [sys.executable, "-m", "vitquant", *argv]
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if args.distributed:
        return subprocess.call(cmd)
    from vitquant.cli import main

    return main(argv)


def _log_action(args: argparse.Namespace) -> int:
    from vitquant.errors import ConfigError
    from vitquant.train.experiment import Experiment

    exp = Experiment(args.experiment)
    records = exp.read_log()
    if not records:
        raise ConfigError(f"{args.experiment}: no log.jsonl (not an experiment, or not started)")
    for r in records:
        parts = [f"epoch {r['epoch']:>3} | valid"]
        if "loss" in r:
            parts.append(f"loss {r['loss']:.4f}")
        if "top1" in r:
            parts.append(f"top1 {r['top1']:.2f}")
        if "model_size_mb" in r:
            parts.append(f"size {r['model_size_mb']:.4f} MB")
        if "compression" in r:
            parts.append(f"x{r['compression']:.2f}")
        if "bits_per_weight" in r:
            parts.append(f"{r['bits_per_weight']:.2f} bits/w")
        print(" | ".join(parts))
    return 0


def _load(experiment: str, which: str, device: Any) -> tuple[Any, Any, dict[str, Any]]:
    from vitquant.errors import ConfigError
    from vitquant.methods.diffq.method import quantizer_of
    from vitquant.train.data import dataset_meta
    from vitquant.train.evaluation import EvalSpec, load_model_for_eval, resolve_data

    if not Path(experiment).is_dir():
        raise ConfigError(f"experiment folder not found: {experiment}")
    spec = EvalSpec(run_dir=experiment, which=which)
    data_path, split, cfg = resolve_data(spec)
    if cfg is None or cfg.method != "diffq":
        raise ConfigError(f"{experiment} is not a diffq experiment (method {cfg and cfg.method})")
    num_classes, in_chans = dataset_meta(data_path)
    model, desc = load_model_for_eval(spec, num_classes, in_chans, device)
    quantizer = quantizer_of(model)
    assert quantizer is not None
    return model, quantizer, {**desc, "data_path": data_path, "split": split, "cfg": cfg}


def _eval_action(args: argparse.Namespace) -> int:
    from vitquant import data as vdata
    from vitquant.methods.diffq.method import size_report
    from vitquant.train.checkpoint import write_json
    from vitquant.train.data import eval_loader, model_img_size
    from vitquant.train.distributed import resolve_device
    from vitquant.train.evaluation import evaluate_model_on

    device = resolve_device(args.device)
    model, quantizer, info = _load(args.experiment, args.which, device)
    cfg = info.pop("cfg")
    img_size = cfg.img_size or model_img_size(model)
    act = args.act_flag or args.act
    if act:
        from vitquant.methods.diffq.act import quantize_activations

        ds = vdata.build_dataset(cfg.data_path, cfg.train_split, img_size=img_size)
        ds = vdata.subset(ds, min(len(ds), args.act_samples * 64), seed=cfg.seed)
        loader = eval_loader(ds, 64)
        quantize_activations(model, loader, act, bits=args.act_bits, samples=args.act_samples)
    metrics = evaluate_model_on(
        model,
        info["data_path"],
        args.split or info["split"],
        img_size=img_size,
        batch_size=args.batch_size,
        subset=args.subset,
        device=device,
    )
    result = {**metrics, **size_report(quantizer, model), **info, "act": act}
    print(
        f"{args.experiment}: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} "
        f"loss {metrics['loss']:.4f} | size {result['model_size_mb']:.4f} MB "
        f"(x{result['compression']:.2f}) | activations {act or 'float'}"
    )
    name = f"eval_act={act}.json" if act else "eval_diffq.json"
    write_json(os.path.join(args.experiment, name), result)
    return 0


def _export_action(args: argparse.Namespace) -> int:
    from vitquant.methods.diffq import save_quantized_state
    from vitquant.train.distributed import resolve_device

    _, quantizer, _ = _load(args.experiment, args.which, resolve_device("cpu"))
    out = Path(args.out or Path(args.experiment) / "quantized.th")
    save_quantized_state(quantizer, out)
    size = out.stat().st_size / 2**20
    print(
        json.dumps(
            {
                "file": str(out),
                "file_mb": round(size, 6),
                "true_model_size_mb": round(quantizer.true_model_size(), 6),
            }
        )
    )
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatches to the action."""
    actions = {"run": _run_action, "log": _log_action, "eval": _eval_action}
    actions["export"] = _export_action
    return actions[args.action](args)

"""``vitquant train``: train a model (float, or a quantization-aware method) in a resumable
experiment folder.

The flags map one to one onto :class:`vitquant.train.TrainConfig` fields (DeiT's ``main.py``
options, Touvron et al., 2021); each training method adds its own flags (its config dataclass's
fields) in its own group. Rerunning the same command resumes the run; under
``torchrun --nproc_per_node N`` the same command trains data-parallel.
"""

from __future__ import annotations

import argparse
from typing import Any

from vitquant.cli._common import add_config_arg, default_data_path

__all__ = ["add_parser", "run", "config_from_args"]


def add_parser(subparsers: Any) -> None:
    """Adds the ``train`` sub-command."""
    from vitquant.methods import METHODS
    from vitquant.train.config import DISTILLATION_TYPES, OPTIMIZERS, TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train a model (resumes when rerun)",
        description="Train a model in runs/<model>/<dataset>/exp_<options>; rerunning the same "
        "command resumes it (mid-epoch too) or reports its result.",
    )
    add_config_arg(p)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help=f"model name (default {d.model})")
    g.add_argument(
        "--data-path",
        default=default_data_path(),
        help="dataset name (digits) or folder (default: $VITQUANT_DATA or Fashion-MNIST)",
    )
    g.add_argument("--train-split", default=d.train_split)
    g.add_argument("--eval-split", default=d.eval_split)
    g.add_argument("--img-size", type=int, default=d.img_size)
    g.add_argument("--train-subset", type=int, default=d.train_subset, help="0: all")
    g.add_argument("--eval-subset", type=int, default=d.eval_subset, help="0: all")
    g.add_argument(
        "--finetune",
        default=None,
        help="float checkpoint or run folder to start from (a head of another class count than "
        "the data's is replaced by a new one, with a warning)",
    )
    g.add_argument(
        "--method",
        default=d.method,
        help=f"training method: {', '.join(METHODS.names())} (default {d.method})",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="0: 2x batch")
    g.add_argument("--opt", choices=OPTIMIZERS, default=d.opt)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min-lr", type=float, default=d.min_lr)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--warmup-lr", type=float, default=d.warmup_lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD")
    g.add_argument("--betas", type=float, nargs=2, default=list(d.betas), help="AdamW/LAMB")
    g.add_argument("--eps", type=float, default=d.eps)
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max grad norm, 0: off")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--drop-path", type=float, default=d.drop_path)
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=d.amp,
        help="bf16 autocast (default: on for CUDA, off on CPU)",
    )
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument(
        "--augment",
        choices=("default", "rrc", "none"),
        default=d.augment,
        help="training augmentation (default: the dataset's)",
    )
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="epochs")
    g = p.add_argument_group("distillation (DeiT)")
    g.add_argument("--teacher", default=None, help="model name, run folder or checkpoint")
    g.add_argument("--teacher-model", default=None, help="architecture of a foreign checkpoint")
    g.add_argument(
        "--distillation-type",
        choices=DISTILLATION_TYPES,
        default="none",
        help="DeiT's soft or hard distillation from --teacher; dgd: Q-ViT's DGD loss (qvit)",
    )
    g.add_argument("--distillation-alpha", type=float, default=d.distillation_alpha)
    g.add_argument("--distillation-tau", type=float, default=d.distillation_tau)
    g = p.add_argument_group("run")
    g.add_argument("--output", default=d.output, help="root of the experiment folders")
    g.add_argument("--name", default=None, help="experiment folder name (default: from options)")
    g.add_argument("--exp-dir", default=None, help="explicit experiment folder")
    g.add_argument("--device", default=d.device)
    g.add_argument("--num-workers", type=int, default=d.num_workers)
    g.add_argument("--save-every-steps", type=int, default=d.save_every_steps, help="0: off")
    g.add_argument("--save-every-minutes", type=float, default=d.save_every_minutes, help="0: off")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps, without a TTY")
    g.add_argument("--quiet", action="store_true", help="print only the result")
    g.add_argument(
        "--_stop-after-steps", dest="_stop_after_steps", type=int, help=argparse.SUPPRESS
    )
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.option_names():
            cls.add_cli_args(p.add_argument_group(f"method {name}"))


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~vitquant.train.TrainConfig` of parsed ``train`` arguments.

    Raises:
        ConfigError: an option of another method was given.
    """
    import dataclasses

    from vitquant.errors import ConfigError
    from vitquant.methods import METHODS, get_method
    from vitquant.train.config import TrainConfig

    method_cls = get_method(args.method)
    values = vars(args)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"method_args"}
    kwargs = {k: values[k] for k in fields if k in values}
    mine = method_cls.option_names()
    others = set().union(*(METHODS.get(n).option_names() for n in METHODS.names())) - mine
    stray = sorted(k for k in others if k in values)
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise ConfigError(f"{flags} do(es) not apply to method {args.method!r}")
    method_args = {k: values[k] for k in mine if k in values}
    kwargs["method_args"] = method_cls.config_from_dict(method_args).to_dict()
    return TrainConfig(**kwargs)


def run(args: argparse.Namespace) -> int:
    """Trains, resumes or reports; prints the final metrics."""
    from vitquant.cli._common import print_metrics
    from vitquant.train import fit
    from vitquant.train.distributed import cleanup

    cfg = config_from_args(args)
    try:
        result = fit(
            cfg,
            exp_dir=args.exp_dir,
            stop_after_steps=args._stop_after_steps,
            quiet=args.quiet,
        )
    finally:
        cleanup()
    if args.quiet:
        print_metrics(result, "final")
    return 0

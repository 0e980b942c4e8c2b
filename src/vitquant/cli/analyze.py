"""``vitquant analyze``: where a model's PTQ loses accuracy (outliers and per-layer sensitivity).

``vitquant analyze --model vit_nano_patch4_28 --data-path digits --img-size 28
--num-calib-batch 4 --calib-batchsz 32 --quant-mode ft1 --output out/`` calibrates a copy of the
model on ``num-calib-batch x calib-batchsz`` training images, prints the table of
:meth:`vitquant.quant.analyze.AnalysisReport.table` (layers by sensitivity, points by outlier
ratio) and writes ``<output>/<model>_analyze.json`` and ``<model>_analyze.png`` (the PNG needs
matplotlib; ``--no-plot`` skips it). ``--inject ln gelu tokens`` first injects test outliers
(:mod:`vitquant.models.outliers`) into the float model, to see what real ViTs' outliers do.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitquant.cli._common import add_config_arg, add_ptq_args, default_data_path, model_stem

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Adds the ``analyze`` sub-command."""
    p = subparsers.add_parser(
        "analyze",
        help="PTQ diagnosis: activation outliers per quantization point, sensitivity per layer",
        description="Calibrate a copy of the model (PTQ), measure the outliers each activation "
        "quantizer sees and the logit error of quantizing one layer at a time; write "
        "<model>_analyze.json and .png.",
    )
    add_config_arg(p)
    add_ptq_args(p)
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: the data's)")
    p.add_argument("--top-k", type=int, default=4, help="channels reported per point")
    p.add_argument(
        "--inject",
        nargs="+",
        default=None,
        choices=("ln", "gelu", "tokens"),
        help="inject test outliers into the float model first",
    )
    p.add_argument("--output", default=".", help="output folder")
    p.add_argument("--no-plot", action="store_true", help="no PNG (no matplotlib needed)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the calibration subset (and of the weights)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(name: str) -> Any:
    import torch

    from vitquant.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r} asked for, but CUDA is not available")
    return dev


def run(args: argparse.Namespace) -> int:
    """Analyzes, prints the table, writes the JSON report and the PNG."""
    import torch
    from torch.utils.data import DataLoader

    from vitquant import data
    from vitquant.errors import CheckpointError, ConfigError
    from vitquant.models import create_model
    from vitquant.models.outliers import inject_outliers
    from vitquant.quant import QuantConfig
    from vitquant.quant.analyze import analyze

    if not args.model:
        raise ConfigError("--model is required (see 'vitquant models')")
    for name in ("num_calib_batch", "calib_batchsz", "top_k"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    config = QuantConfig(
        preset=args.quant_mode,
        wbits=args.wbits,
        abits=args.abits,
        calibrator=args.calibrator,
        percentile=args.percentile,
    )
    device = _device(args.device)
    source = args.dataset or args.data_path or default_data_path()
    extra = {"data_path": args.data_path} if args.dataset and args.data_path else {}
    data_classes = None if args.num_classes else data.dataset_info(source, **extra).num_classes
    kwargs: dict[str, Any] = {}
    if args.num_classes or not args.pretrained:
        kwargs["num_classes"] = args.num_classes or data_classes
    if args.img_size:
        kwargs["img_size"] = args.img_size
    torch.manual_seed(args.seed)  # a model without --pretrained: the same weights every run
    model = create_model(args.model, checkpoint_path=args.pretrained, **kwargs).eval()
    classes = int(getattr(model, "num_classes", 0))
    if data_classes is not None and classes != data_classes:
        raise CheckpointError(
            f"--pretrained {args.pretrained} predicts {classes} classes but the data {source} has "
            f"{data_classes} (--num-classes builds the model for another count)"
        )
    in_chans = int(model.patch_embed.proj.in_channels) if hasattr(model, "patch_embed") else 3
    calib_ds = data.build_dataset(
        source, "train", img_size=args.img_size, train_transform=False, in_chans=in_chans, **extra
    )
    calib_ds = data.subset(calib_ds, args.num_calib_batch * args.calib_batchsz, seed=args.seed)
    loader = DataLoader(calib_ds, batch_size=args.calib_batchsz, shuffle=False)
    model.to(device)
    if args.inject:
        for inj in inject_outliers(model, loader, kinds=tuple(dict.fromkeys(args.inject))):
            print(
                f"injected {inj.kind} outliers: {inj.layers[0]} channels {inj.channels} "
                f"(float agreement {100 * inj.agreement.get('agreement', 1.0):.1f}%)"
            )
    report = analyze(
        model,
        loader,
        config,
        top_k=args.top_k,
        progress=not args.no_progress,
        name=args.model,
    )
    print(report.table())
    out = Path(args.output)
    written = [report.to_json(out / f"{model_stem(args.model)}_analyze.json")]
    if not args.no_plot:
        written.append(report.plot(out / f"{model_stem(args.model)}_analyze.png"))
    print("wrote " + " and ".join(str(p) for p in written))
    return 0

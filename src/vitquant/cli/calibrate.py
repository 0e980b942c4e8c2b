"""``vitquant calibrate``: post-training quantization, as FasterTransformer's ViT ``--calib``.

``vitquant calibrate --model ViT-B_16 --pretrained ViT-B_16.npz --data-path /data/imagenet
--img-size 384 --num-calib-batch 20 --calib-batchsz 8 --quant-mode ft2 --calibrator percentile
--percentile 99.99 --calib-output-path out/`` calibrates on ``num-calib-batch x calib-batchsz``
training images, evaluates float and quantized models on the validation split (side by side),
prints the quantizer table and writes ``<calib-output-path>/<model>_calib.pth`` (load it with
``vitquant eval --quantized``) and ``<model>_calib.json`` (the results).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from vitquant.cli._common import add_config_arg, add_ptq_args, default_data_path, model_stem

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Adds the ``calibrate`` sub-command."""
    p = subparsers.add_parser(
        "calibrate",
        help="post-training quantization: calibrate, compare float vs quantized accuracy",
        description="Calibrate quantizers on training images (PTQ), evaluate float and quantized "
        "models, and save <model>_calib.pth.",
    )
    add_config_arg(p)
    add_ptq_args(p)
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes (default: the dataset's, which --pretrained's head must predict)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--max-eval-batches", type=int, default=0, help="0: the whole val split")
    p.add_argument(
        "--softmax-quantizer", default=None, help="uniform, log2 or log2_sqrt2 (softmax output)"
    )
    p.add_argument(
        "--ln-reparam",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="RepQ-ViT LayerNorm reparameterisation (default: the mode's)",
    )
    p.add_argument(
        "--act-dynamic",
        action="store_true",
        help="per-token dynamic scales on every Linear input (LLM.int8 / ZeroQuant style; "
        "lowers to integer GEMMs)",
    )
    p.add_argument("--weight-granularity", default=None, help="tensor, channel or group:<n>")
    p.add_argument(
        "--passes",
        nargs="*",
        default=None,
        help="calibration passes (default: the mode's): smooth, output_mse, reconstruct, "
        "bias_correct",
    )
    p.add_argument(
        "--smooth-alpha",
        default=None,
        help="SmoothQuant migration strength 0..1, or 'search' (per layer); adds the smooth pass",
    )
    p.add_argument(
        "--reconstruct",
        action="store_true",
        help="block reconstruction after calibration (AdaRound/BRECQ; adds the reconstruct pass, "
        "which --quant-mode lowbit has)",
    )
    p.add_argument(
        "--reconstruct-iters", type=int, default=None, help="reconstruction steps per block"
    )
    p.add_argument(
        "--reconstruct-loss",
        choices=("mse", "fisher"),
        default=None,
        help="block output loss: mse (default) or fisher (BRECQ's Fisher-weighted MSE)",
    )
    fb = p.add_argument_group("accuracy-driven fallback (keep the most sensitive layers higher)")
    budget = fb.add_mutually_exclusive_group()
    budget.add_argument("--max-drop", type=float, default=None, help="allowed top-1 drop (points)")
    budget.add_argument(
        "--target-agreement", type=float, default=None, help="top-1 agreement with float (%%)"
    )
    fb.add_argument("--fallback-bits", default="8", help="bits of kept layers: 8 or float")
    fb.add_argument(
        "--fallback-images", type=int, default=1000, help="validation images the budget uses"
    )
    p.add_argument("--narrow-range", action="store_true", help="[-127, 127] signed grids")
    p.add_argument("--calib-output-path", default=".", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _loaders(args: argparse.Namespace, source: str, extra: dict[str, Any], in_chans: int) -> Any:
    from torch.utils.data import DataLoader

    from vitquant import data

    n_calib = args.num_calib_batch * args.calib_batchsz
    common = dict(img_size=args.img_size, train_transform=False, in_chans=in_chans, **extra)
    calib_ds = data.subset(data.build_dataset(source, "train", **common), n_calib, seed=args.seed)
    val_ds = data.build_dataset(source, "val", **common)
    if args.max_eval_batches:
        val_ds = data.subset(val_ds, args.max_eval_batches * args.batch_size, seed=args.seed)
    calib = DataLoader(calib_ds, batch_size=args.calib_batchsz, shuffle=False)
    val = DataLoader(
        val_ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers
    )
    return calib, val


def _passes(args: argparse.Namespace) -> tuple[list[str] | None, dict[str, dict[str, Any]]]:
    """``QuantConfig.passes`` / ``pass_options`` from ``--passes`` and ``--smooth-alpha``."""
    from vitquant.errors import ConfigError
    from vitquant.quant.presets import PRESETS, resolve_preset

    passes = None if args.passes is None else list(args.passes)
    options: dict[str, dict[str, Any]] = {}
    if args.smooth_alpha is not None:
        alpha: float | str = args.smooth_alpha
        if alpha != "search":
            try:
                alpha = float(alpha)
            except ValueError:
                raise ConfigError(
                    f"--smooth-alpha {alpha!r}: a number in 0..1 or 'search'"
                ) from None
        options["smooth"] = {"alpha": alpha}
        if passes is None:
            passes = list(PRESETS[resolve_preset(args.quant_mode)].passes)
        if "smooth" not in passes:
            passes.insert(0, "smooth")
    if args.reconstruct or args.reconstruct_iters is not None or args.reconstruct_loss:
        if passes is None:
            passes = list(PRESETS[resolve_preset(args.quant_mode)].passes)
        if "reconstruct" not in passes:
            passes.append("reconstruct")
        rec: dict[str, Any] = {"progress": not args.no_progress}
        if args.reconstruct_iters is not None:
            if args.reconstruct_iters < 1:
                raise ConfigError("--reconstruct-iters must be at least 1")
            rec["iterations"] = args.reconstruct_iters
        if args.reconstruct_loss:
            rec["loss"] = args.reconstruct_loss
        options["reconstruct"] = rec
    return passes, options


def _fallback_images(args: argparse.Namespace, val: Any) -> list[Any]:
    """The first ``--fallback-images`` validation images, as ``(input, label)`` batches."""
    batches, seen = [], 0
    for x, y in val:
        if seen >= args.fallback_images:
            break
        batches.append((x, y))
        seen += len(y)
    return batches


def _fallback_options(args: argparse.Namespace) -> dict[str, Any]:
    """``higher_bits`` and the budget (``max_drop`` or ``target_agreement``) of the fallback."""
    from vitquant.errors import ConfigError

    bits = args.fallback_bits
    if str(bits).lower() == "float":
        higher: int | None = None
    else:
        try:
            higher = int(bits)
        except ValueError:
            raise ConfigError(f"--fallback-bits {bits!r}: 8 (or other bits) or float") from None
    budget = (
        {"max_drop": args.max_drop}
        if args.max_drop is not None
        else {"target_agreement": args.target_agreement}
    )
    return {"higher_bits": higher, **budget}


def _fallback(args: argparse.Namespace, model: Any, qmodel: Any, calib: Any, val: Any) -> Any:
    """Runs :func:`vitquant.methods.ptq.fallback.fallback` on the first validation images."""
    from vitquant.methods.ptq.fallback import fallback

    batches = _fallback_images(args, val)
    return fallback(
        model,
        qmodel,
        batches,
        calib_batches=list(calib),
        progress=not args.no_progress,
        **_fallback_options(args),
    )


def run(args: argparse.Namespace) -> int:
    """Calibrates, evaluates, prints the comparison and the quantizer table, saves the model."""
    from vitquant.errors import CheckpointError, ConfigError
    from vitquant.methods.ptq.fallback_reconstructed import fallback_with_reconstruction
    from vitquant.methods.ptq.sweep import config_label, run_ptq
    from vitquant.models import create_model
    from vitquant.quant import QuantConfig, format_summary, quant_summary, save_calibrated
    from vitquant.train.checkpoint import write_json
    from vitquant.train.data import dataset_meta
    from vitquant.train.distributed import resolve_device
    from vitquant.train.engine import evaluate

    if not args.model:
        raise ConfigError("--model is required (see 'vitquant models')")
    passes, pass_options = _passes(args)
    config = QuantConfig(
        passes=passes,
        pass_options=pass_options,
        preset=args.quant_mode,
        wbits=args.wbits,
        abits=args.abits,
        calibrator=args.calibrator,
        percentile=args.percentile,
        softmax_quantizer=args.softmax_quantizer,
        ln_reparam=args.ln_reparam,
        act_dynamic=args.act_dynamic,
        weight_granularity=args.weight_granularity,
        narrow=args.narrow_range,
    )
    for name in ("num_calib_batch", "calib_batchsz", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    device = resolve_device(args.device)
    source = args.dataset or args.data_path or default_data_path()
    extra = {"data_path": args.data_path} if args.dataset and args.data_path else {}
    data_classes = dataset_meta(source)[0] if not args.num_classes else None
    kwargs: dict[str, Any] = {}
    if args.num_classes or not args.pretrained:  # else the checkpoint's count, checked below
        kwargs["num_classes"] = args.num_classes or data_classes
    if args.img_size:
        kwargs["img_size"] = args.img_size
    model = create_model(args.model, checkpoint_path=args.pretrained, **kwargs).to(device).eval()
    classes = int(getattr(model, "num_classes", 0))
    if data_classes is not None and classes != data_classes:
        raise CheckpointError(
            f"--pretrained {args.pretrained} predicts {classes} classes but the data {source} has "
            f"{data_classes} (--num-classes builds the model for another count)"
        )
    kwargs["num_classes"] = classes  # saved with the calibrated model
    in_chans = int(model.patch_embed.proj.in_channels) if hasattr(model, "patch_embed") else 3
    calib, val = _loaders(args, source, extra, in_chans)

    float_metrics = evaluate(model, val, device)
    use_fallback = args.max_drop is not None or args.target_agreement is not None
    late_reconstruct = use_fallback and "reconstruct" in config.effective_passes
    progress = not args.no_progress
    fallback_report = None
    if late_reconstruct:
        # the fallback must see the float weights (reconstruction moves them onto their low-bit
        # grid): the full recipe if it meets the budget, else fallback without reconstruction,
        # reconstruct, and return raised layers the reconstruction made unnecessary
        t0 = time.perf_counter()
        res = fallback_with_reconstruction(
            model, config, list(calib), _fallback_images(args, val), progress=progress,
            **_fallback_options(args),
        )  # fmt: skip
        qmodel, fallback_report = res.model, res.report
        row = {"label": config_label(config), "config": res.config.to_dict()}
        row["calib_seconds"] = round(time.perf_counter() - t0, 2)
        if fallback_report is None:
            print("the reconstructed model meets the budget: no fallback needed")
        elif res.lowered:
            print(f"after reconstruction, back at low precision: {', '.join(res.lowered)}")
    else:
        qmodel, row = run_ptq(model, config, calib, None, device=device, progress=progress)
        if use_fallback:
            fallback_report = _fallback(args, model, qmodel, calib, val)
    row.update(evaluate(qmodel, val, device))
    print(format_summary(quant_summary(qmodel)))
    print()
    print(f"{'':10} {'top-1':>8} {'top-5':>8} {'loss':>8}   ({float_metrics['images']} images)")
    for label, m in (("float", float_metrics), ("quantized", row)):
        print(f"{label:10} {m['top1']:8.2f} {m['top5']:8.2f} {m['loss']:8.4f}")
    print(f"{'delta':10} {row['top1'] - float_metrics['top1']:+8.2f}   [{config_label(config)}]")

    out_dir = Path(args.calib_output_path)
    path = save_calibrated(
        qmodel,
        out_dir / f"{model_stem(args.model)}_calib.pth",
        model_name=args.model,
        model_kwargs=kwargs,
    )
    result = {
        "model": args.model,
        "pretrained": args.pretrained,
        "data": source,
        "calib_images": args.num_calib_batch * args.calib_batchsz,
        "float": float_metrics,
        "quantized": {k: row[k] for k in ("top1", "top5", "loss", "images")},
        "label": row["label"],
        "config": row["config"],
        "calibrated_file": str(path),
    }
    if fallback_report is not None:
        result["fallback"] = fallback_report.to_dict()
        print(fallback_report.table())
    json_path = out_dir / f"{model_stem(args.model)}_calib.json"
    write_json(json_path, result)
    print(f"wrote {path} and {json_path}")
    return 0

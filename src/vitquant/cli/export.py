"""``vitquant export``: write a packed quantized export (safetensors + JSON header).

Two sources:

* ``vitquant export --quantized runs/vit_micro_calib.pth -o model.safetensors``: a calibrated
  model from ``vitquant calibrate`` (W8A8, W4A8, ...);
* ``vitquant export --model deit_tiny_patch16_224 --pretrained w.pth --wbits 4 -o w4.safetensors``:
  weight-only quantization (per-channel max calibration of the weights; no data needed).

The file loads with ``vitquant.load_quantized(path)`` and ``vitquant size`` reports its sizes.

``--format onnx`` writes an ONNX graph with QuantizeLinear/DequantizeLinear pairs instead
(``vitquant.export.onnx.to_onnx``; ``--check`` runs it on onnxruntime against the fake-quant
model), ``--format pt2`` a ``torch.export`` program (``--int8``: of the lowered int8 model;
``vitquant.export.torch_export``). ``--quantized`` also takes a packed ``.safetensors`` export
(e.g. of a QAT run).
"""

from __future__ import annotations

import argparse
from typing import Any

from vitquant.cli._common import add_config_arg

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Adds the ``export`` sub-command."""
    p = subparsers.add_parser(
        "export",
        help="write a packed low-bit export (safetensors + JSON header)",
        description="Pack a calibrated model (--quantized) or a weight-only quantized model "
        "(--model --wbits) into a safetensors export with a JSON header and a checksum.",
    )
    add_config_arg(p)
    p.add_argument("--quantized", metavar="CALIB", help="calibrated model (.pth from calibrate)")
    p.add_argument("--model", help="model name for weight-only export (vitquant models)")
    p.add_argument("--pretrained", metavar="FILE", help="float weights for --model")
    p.add_argument(
        "--num-classes", type=int, default=None, help="classes (default: --pretrained's head's)"
    )
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--wbits", type=int, default=8, help="weight bits for --model (2..8)")
    p.add_argument(
        "--weight-granularity", default="channel", help="tensor, channel or group:<n> (--model)"
    )
    p.add_argument("-o", "--output", required=False, default=None, help="output file")
    p.add_argument(
        "--format",
        default="safetensors",
        choices=("safetensors", "onnx", "pt2"),
        help="safetensors (packed, default), onnx (QDQ graph) or pt2 (torch.export program)",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument(
        "--exporter",
        default="torchscript",
        choices=("torchscript", "dynamo"),
        help="ONNX exporter (dynamo: opset 18+, needed for opset 21 per-group weights)",
    )
    p.add_argument(
        "--unsupported",
        default="error",
        choices=("error", "float"),
        help="ONNX: points QDQ cannot express (log2 softmax): error, or leave them float",
    )
    p.add_argument(
        "--check", action="store_true", help="ONNX: compare onnxruntime with the fake-quant model"
    )
    p.add_argument("--int8", action="store_true", help="pt2: export the lowered int8 model")


def _weight_only(args: argparse.Namespace) -> tuple[Any, str, dict[str, Any]]:
    from vitquant.models import create_model
    from vitquant.quant import QuantConfig, calibrate, prepare

    kwargs: dict[str, Any] = {}
    for key in ("num_classes", "img_size", "in_chans"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    model = create_model(args.model, checkpoint_path=args.pretrained, **kwargs).eval()
    kwargs["num_classes"] = int(model.num_classes)  # the checkpoint's when not given
    cfg = QuantConfig(
        preset="weight_only",
        wbits=args.wbits,
        weight_granularity=args.weight_granularity,
        quantize_head=False,
    )
    prepare(model, cfg)
    calibrate(model, [_dummy(model)], method="max", progress=False)
    return model, args.model, kwargs


def _dummy(model: Any) -> Any:
    import torch

    pe = model.patch_embed
    return torch.zeros(1, pe.proj.in_channels, pe.img_size[0], pe.img_size[1])


def run(args: argparse.Namespace) -> int:
    """Builds or loads the quantized model, writes the export, prints its sizes."""
    from vitquant.errors import ConfigError
    from vitquant.export.io import save_quantized, size_report

    if bool(args.quantized) == bool(args.model):
        raise ConfigError("give exactly one of --quantized CALIB or --model NAME")
    if not args.output:
        raise ConfigError("--output FILE is required")
    if args.format != "safetensors":
        return _graph_export(args)
    if args.quantized:
        from vitquant.quant import load_calibrated

        model = load_calibrated(args.quantized)
        path = save_quantized(model, args.output)
    else:
        model, name, kwargs = _weight_only(args)
        path = save_quantized(model, args.output, model_name=name, model_kwargs=kwargs)
    rep = size_report(path)
    print(
        f"wrote {path}: {rep['file_bytes'] / 2**20:.2f} MiB (true quantized "
        f"{rep['quantized_bytes'] / 2**20:.2f} MiB, float32 {rep['float32_bytes'] / 2**20:.2f} "
        f"MiB, {rep['compression']:.2f}x)"
    )
    return 0


def _graph_export(args: argparse.Namespace) -> int:
    """``--format onnx`` / ``pt2``: trace the quantized model into an ONNX or torch.export file."""
    import warnings

    import torch

    if args.quantized and str(args.quantized).endswith(".safetensors"):
        from vitquant.export.io import load_quantized

        model = load_quantized(args.quantized)
    elif args.quantized:
        from vitquant.quant import load_calibrated

        model = load_calibrated(args.quantized)
    else:
        model = _weight_only(args)[0]
    x = _dummy(model)
    if args.format == "onnx":
        from vitquant.export.onnx import to_onnx

        rep = to_onnx(
            model, args.output, x, opset=args.opset, exporter=args.exporter,
            unsupported=args.unsupported,
        )  # fmt: skip
        print(rep.summary())
        if args.check:
            from vitquant.export.onnx_run import compare_onnx

            batch = torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(0))
            r = compare_onnx(model, rep.path, batch)
            print(
                f"onnxruntime vs fake-quant on 8 random images: cosine {r['cosine']:.6f}, "
                f"top-1 agreement {r['top1_agreement']:.3f}, max |diff| {r['max_abs_diff']:.3g}"
            )
        return 0
    from vitquant.export.torch_export import export_program, save_program

    if args.int8:
        from vitquant.runtime import lower

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lower(model, "intmm")  # portable: no oneDNN handles in the program
    path = save_program(export_program(model, x), args.output)
    kind = "lowered int8" if args.int8 else "fake-quant"
    print(f"wrote {path}: torch.export program of the {kind} model")
    return 0

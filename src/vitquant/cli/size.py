"""``vitquant size <file or model>``: float32 size, true quantized size, file size, ratio.

* an export (``.safetensors`` from ``vitquant export``): sizes from its verified header plus the
  file size;
* a calibrated model (``.pth`` from ``vitquant calibrate``): the sizes its export would have;
* a model name: its float32 size, and with ``--wbits N`` the size of a weight-only N-bit export.

Every tensor left in float (biases, norms, embeddings, ...) is listed with ``--list-float``
(the default prints the count and the largest ones).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Adds the ``size`` sub-command."""
    p = subparsers.add_parser(
        "size",
        help="report float32, true quantized and file sizes of an export or a model",
        description="Sizes of a quantized export, a calibrated model or a model name.",
    )
    p.add_argument("target", help="export .safetensors, calibrated .pth, or a model name")
    p.add_argument("--wbits", type=int, default=None, help="model name: weight-only bits")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--list-float", action="store_true", help="list every float tensor")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f} MiB ({int(n):,} B)"


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from vitquant.errors import ConfigError
    from vitquant.export.io import model_size_report, size_report

    target = args.target
    if os.path.isfile(target):
        if target.endswith(".safetensors"):
            return size_report(target)
        if target.endswith((".pth", ".pt")):
            from vitquant.quant import load_calibrated

            return model_size_report(load_calibrated(target))
        raise ConfigError(f"{target}: expected an export (.safetensors) or a calibrated .pth")
    from vitquant.models import create_model

    kwargs: dict[str, Any] = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    model = create_model(target, **kwargs).eval()
    if args.wbits is None:
        numel = sum(p.numel() for p in model.parameters())
        floats = [[n, p.numel()] for n, p in model.named_parameters()]
        return {"float32_bytes": 4 * numel, "quantized_bytes": 4 * numel, "compression": 1.0,
                "float_tensors": floats, "bits": {}}  # fmt: skip
    from vitquant.quant import QuantConfig, prepare

    prepare(model, QuantConfig(preset="weight_only", wbits=args.wbits))
    for _, m in model.named_modules():
        q = getattr(m, "weight_quantizer", None)
        if q is not None:
            q.calibrate_tensor(m.weight.detach(), "max")
    return model_size_report(model)


def run(args: argparse.Namespace) -> int:
    """Prints the size report."""
    rep = _report(args)
    if args.json:
        import json

        print(json.dumps(rep, indent=2))
        return 0
    print(f"float32 size      {_mib(rep['float32_bytes'])}")
    print(f"quantized size    {_mib(rep['quantized_bytes'])}  (true: packed codes + floats)")
    if "file_bytes" in rep:
        print(
            f"file size         {_mib(rep['file_bytes'])}  "
            f"({100 * (rep['file_vs_quantized'] - 1):+.2f}% vs true)"
        )
    print(f"compression       {rep['compression']:.2f}x vs float32")
    if rep.get("bits"):
        print("packed weights    " + ", ".join(f"{n} x {b}-bit" for b, n in rep["bits"].items()))
    floats = rep.get("float_tensors", [])
    total = sum(n for _, n in floats)
    print(f"left in float     {len(floats)} tensors, {total:,} values")
    shown = floats if args.list_float else sorted(floats, key=lambda t: -t[1])[:10]
    for name, n in shown:
        print(f"  {name:50s} {n:>12,}")
    if not args.list_float and len(floats) > len(shown):
        print(f"  ... {len(floats) - len(shown)} more (--list-float)")
    return 0

"""Evaluation speed of a fake-quant model whose q·kᵀ and attn·v run as exact integer sums.

``QuantMatMul.integer_product`` sums the codes exactly, in float32 while a bound on the sums
fits float32's mantissa, else in float64. The grids' bound (``K * range_a * range_b``) passes
2**24 for 8-bit attn·v beyond 258 tokens; ``vitquant.quant.primitives.product_bound`` takes the
bound from the data instead (softmax rows sum to about 255). This script times the same
calibrated W8A8 model with the data bound ("data") and with the grids' bound alone ("grid",
the previous behaviour), alternated round by round in one process, and checks that both give
bit-identical logits.

Example:
    PYTHONPATH=src python benchmarks/bench_integer_product.py --model vit_small_patch16_384 \\
        --batch 2 --repeats 7 --json benchmarks/results/bench_integer_product.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_int8_common import machine, summarize, time_alternating  # noqa: E402

import vitquant  # noqa: E402
from vitquant._atomic import atomic_write_json  # noqa: E402
from vitquant.quant import QuantConfig, calibrate, prepare  # noqa: E402
from vitquant.quant import primitives as P  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_384")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = vitquant.create_model(args.model).eval()
    prepare(model, QuantConfig(wbits=8, abits=8))
    size = model.patch_embed.img_size
    x = torch.randn(args.batch, 3, *size)
    calibrate(
        model, [(x, torch.zeros(args.batch, dtype=torch.long))], num_batches=1, progress=False
    )
    data_bound = P.product_bound
    logits: dict[str, torch.Tensor] = {}

    def forward(name: str) -> None:
        P.product_bound = data_bound if name == "data" else (lambda a, b: float("inf"))
        try:
            with torch.no_grad():
                logits[name] = model(x)
        finally:
            P.product_bound = data_bound

    times = time_alternating(
        {"grid": lambda: forward("grid"), "data": lambda: forward("data")}, args.repeats, 1
    )
    rows = summarize(times, "grid")
    report = {
        "machine": machine(),
        "model": args.model,
        "batch": args.batch,
        "tokens": model.patch_embed.num_patches + 1,
        "grid_ms": rows["grid"]["median_ms"],
        "data_ms": rows["data"]["median_ms"],
        "speedup": rows["data"]["speedup_vs_timm_fp32"],  # median of per-round grid/data
        "identical_logits": bool(torch.equal(logits["grid"], logits["data"])),
    }
    print(
        f"{args.model} b{args.batch} ({report['tokens']} tokens), {report['machine']['cpu']}: "
        f"grid bound {report['grid_ms']:.1f} ms, data bound {report['data_ms']:.1f} ms, "
        f"{report['speedup']:.2f}x; identical logits: {report['identical_logits']}"
    )
    if args.json:
        atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()

"""Speed and agreement of the lowered int8 models of the outlier recipes against plain int8.

The PTQ issue asks that the recipes which handle outliers (SmoothQuant migration folded into
LayerNorm or into ``fc2``'s input quantization, searched strength, output-MSE ranges,
reconstruction) lower to the int8 runtime with logits that agree with their fake-quant models
(cosine > 0.99) and run within 10% of the plain int8 model (FasterTransformer's ft1 lowered).
This script calibrates each recipe on the same random images, lowers it, checks the agreement
on other images, and times the lowered models alternately in one process (A B C A B C ...),
printing medians and the ratio to plain ft1. The CPU and its ISA flags go into the JSON.

Example:
    PYTHONPATH=src python benchmarks/bench_ptq_lowered.py --model deit_small_patch16_224 \\
        --batch-size 8 --repeats 10 --out benchmarks/results/ptq_lowered_deit_s.json

``--kernel-times`` adds the time each native kernel takes per forward (after the timing rounds,
with timers around the kernels).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from bench_ptq_time import cpu_info, randomize  # the same folder
from torch import Tensor, nn

import vitquant
from vitquant._atomic import atomic_write_json
from vitquant.quant import QuantConfig, calibrate, prepare
from vitquant.runtime import lower, lowering_report, native
from vitquant.runtime import rows as rows_mod

RECIPES: dict[str, QuantConfig] = {
    "ft1 (plain int8)": QuantConfig("ft1", 8, 8),
    "default (robust, smooth 0.5)": QuantConfig(wbits=8, abits=8),
    "robust, smooth searched": QuantConfig(
        wbits=8, abits=8, passes=["smooth", "output_mse"],
        pass_options={"smooth": {"alpha": "search"}},
    ),
    "robust, per-token dynamic inputs": QuantConfig(wbits=8, abits=8, act_dynamic=True),
    "robust, per-token dynamic fc2 input": QuantConfig(
        wbits=8, abits=8, overrides={"*.fc2.input_quantizer": {"quantizer": "dynamic"}},
    ),
    "ft1, 4-bit log-sqrt2 softmax": QuantConfig(
        "ft1", 8, 8, softmax_quantizer="log2_sqrt2", softmax_bits=4,
    ),
    "ft1, 8-bit log-sqrt2 softmax": QuantConfig("ft1", 8, 8, softmax_quantizer="log2_sqrt2"),
}  # fmt: skip


@torch.no_grad()
def timed(model: nn.Module, x: Tensor) -> float:
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0


KERNELS = {
    rows_mod: ("layernorm_quant", "layernorm_row_quant", "row_quant", "row_epilogue",
               "row_epilogue_gelu_quant"),
    native: ("qk_softmax", "vnni_bmm", "vnni_bmm_quant"),
}  # fmt: skip


@torch.no_grad()
def kernel_times(model: nn.Module, x: Tensor, repeats: int = 4) -> dict[str, float]:
    """Milliseconds per forward spent in each native kernel (wrapped with timers while it runs;
    the modules call them through their modules' attributes)."""
    spent: dict[str, float] = {}
    saved = []

    def timer(name: str, f: Any) -> Any:
        def run(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = f(*a, **kw)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
            return out

        return run

    for mod, names in KERNELS.items():
        for name in names:
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, timer(name, getattr(mod, name)))
    try:
        for _ in range(repeats):
            model(x)
    finally:
        for mod, name, f in saved:
            setattr(mod, name, f)
    return {k: round(1e3 * v / repeats, 2) for k, v in sorted(spent.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--kernel-times", action="store_true",
        help="also time the native row and attention kernels inside each lowered model",
    )  # fmt: skip
    ap.add_argument(
        "--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES), metavar="NAME",
        help="recipes to run (the first is the baseline of the ratios; default: all)",
    )  # fmt: skip
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = randomize(vitquant.create_model(args.model).eval())
    size = int(getattr(model.patch_embed, "img_size", (224, 224))[0])
    g = torch.Generator().manual_seed(0)
    calib = list(torch.randn(args.calib_images, 3, size, size, generator=g).split(8))
    x = torch.randn(args.batch_size, 3, size, size, generator=g)
    cpu = cpu_info()
    print(f"{args.model}, batch {args.batch_size}, {args.threads} threads, {cpu['name']} "
          f"[{' '.join(cpu['flags'])}]", flush=True)  # fmt: skip
    lowered: dict[str, nn.Module] = {}
    rows: dict[str, dict[str, float | str | list[str]]] = {}
    for name in args.recipes:
        cfg = RECIPES[name]
        q = calibrate(prepare(copy.deepcopy(model), cfg), calib, progress=False)
        with torch.no_grad():
            ref = q(x)
        low = lower(copy.deepcopy(q), warn=False)
        with torch.no_grad():
            y = low(x)
        rep = lowering_report(low)
        cos = float(F.cosine_similarity(y.flatten(), ref.flatten(), dim=0))
        agree = float((y.argmax(-1) == ref.argmax(-1)).float().mean())
        rows[name] = {
            "cosine": cos, "top1_agreement": agree, "backend": str(rep["backend"]),
            "smoothed": list(rep["smoothed"]), "kept_float": list(rep["kept"]),
        }  # fmt: skip
        lowered[name] = low
        timed(low, x)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in lowered}
    for _ in range(args.repeats):
        for n, m in lowered.items():
            times[n].append(timed(m, x))
    base = statistics.median(times[args.recipes[0]])
    for n in lowered:
        med = statistics.median(times[n])
        rows[n].update(ms=1e3 * med, ratio_to_plain=med / base)
        r = rows[n]
        print(f"{n:30s} {1e3 * med:8.1f} ms  x{med / base:5.2f} of plain   cosine {r['cosine']:.5f}"
              f"  top-1 agreement {r['top1_agreement']:.3f}  smoothed {len(r['smoothed'])}",
              flush=True)  # fmt: skip
    if args.kernel_times:
        for n, m in lowered.items():
            rows[n]["kernel_ms"] = kernel_times(m, x)
            print(f"{n:30s} native kernels, ms per forward: {rows[n]['kernel_ms']}", flush=True)
    if args.out:
        report = {"model": args.model, "batch": args.batch_size, "threads": args.threads,
                  "cpu": cpu, "torch": torch.__version__, "rows": rows}  # fmt: skip
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()

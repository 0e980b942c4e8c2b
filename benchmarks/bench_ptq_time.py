"""Wall time of PTQ calibration (``prepare`` + ``calibrate``) per recipe, beside a float pass.

The PTQ issue's budgets: W8A8 calibration of a DeiT-S-size model with 128 images in at most
3 minutes on 2 cores, and the low-bit recipe with block reconstruction on a ViT-Ti-size model in
at most 20 minutes. Images are random (no dataset is needed and the cost does not depend on
their content); weights are the model's random initialisation made less uniform
(``randomize``), so the SmoothQuant search sees varied channels. Each recipe runs once (minutes
long, so one run is the measurement); the float forward over the same images is timed before
and after the recipes, and each time is also given as a multiple of that float pass, which
cancels most of the machine's load. The CPU and its ISA flags go into the JSON.

Example:
    PYTHONPATH=src python benchmarks/bench_ptq_time.py --model deit_small_patch16_224 \\
        --recipes default ft1 ft2 --threads 2 --out benchmarks/results/ptq_time_deit_s.json
    PYTHONPATH=src python benchmarks/bench_ptq_time.py --model vit_tiny_patch16_224 \\
        --recipes lowbit-w4a4 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import vitquant
from vitquant._atomic import atomic_write_json
from vitquant.quant import QuantConfig, calibrate, prepare

RECIPES: dict[str, QuantConfig] = {
    "default": QuantConfig(wbits=8, abits=8),
    "ft1": QuantConfig("ft1", 8, 8),
    "ft2": QuantConfig("ft2", 8, 8),
    "search-w8a8": QuantConfig(wbits=8, abits=8, pass_options={"smooth": {"alpha": "search"}}),
    "lowbit-w6a6": QuantConfig("lowbit", 6, 6),
    "lowbit-w4a4": QuantConfig("lowbit", 4, 4),
}  # fmt: skip

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_info() -> dict[str, Any]:
    """The CPU's name and the ISA flags that matter for int8/bf16 kernels."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"name": name, "flags": [f for f in ISA_FLAGS if f in flags]}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random LayerNorm affine parameters (varied per channel, as in trained models)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.2, 3.0, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


@torch.no_grad()
def float_pass(model: nn.Module, batches: list[Tensor]) -> float:
    t0 = time.perf_counter()
    for x in batches:
        model(x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--recipes", nargs="+", default=["default", "ft1", "ft2"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {unknown}; use {', '.join(RECIPES)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = randomize(vitquant.create_model(args.model).eval())
    size = int(getattr(model.patch_embed, "img_size", (224, 224))[0])
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, size, size, generator=g)
    batches = list(images.split(args.batch_size))
    cpu = cpu_info()
    print(f"{args.model}, {args.images} images, {args.threads} threads, {cpu['name']} "
          f"[{' '.join(cpu['flags'])}]", flush=True)  # fmt: skip
    fwd = [float_pass(model, batches)]
    print(f"{'float forward':22s} {fwd[0]:7.1f} s", flush=True)
    rows = []
    for name in args.recipes:
        t0 = time.perf_counter()
        q = prepare(copy.deepcopy(model), RECIPES[name])
        calibrate(q, batches, progress=False)
        sec = time.perf_counter() - t0
        rows.append({"recipe": name, "seconds": sec})
        print(f"{name:22s} {sec:7.1f} s  ({sec / fwd[0]:.1f}x the float pass)", flush=True)
        del q
    fwd.append(float_pass(model, batches))
    ref = sorted(fwd)[len(fwd) // 2 - 1 + len(fwd) % 2]
    for r in rows:
        r["x_float_pass"] = r["seconds"] / ref
    report = {
        "model": args.model,
        "images": args.images,
        "threads": args.threads,
        "cpu": cpu,
        "torch": torch.__version__,
        "float_pass_seconds": fwd,
        "configs": {n: RECIPES[n].to_dict() for n in args.recipes},
        "rows": rows,
    }
    if args.out:
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()

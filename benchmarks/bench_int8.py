"""Int8 inference speed: float32 eager vs vitquant int8 vs torch's ``quantize_dynamic``.

DeiT-S and ViT-B/16 at 224 (random weights: speed does not depend on them), batch 1 and 8.
Every variant of one (model, batch) runs in the same process, alternated round by round
(A B C A B C ...), and the script prints median times and median per-round ratios against
float32 eager, plus weight memory, and writes everything as JSON.

Variants:
* ``fp32``: the float model, eager.
* ``vitquant-int8``: ``prepare(ft1 W8A8) -> calibrate -> vitquant.runtime.lower`` (oneDNN int8
  GEMMs with fused epilogues on CPU, ``torch._int_mm`` on CUDA).
* ``quantize_dynamic``: ``torch.ao.quantization.quantize_dynamic`` (int8 weights, activations
  quantized per call, float between layers); CPU only, the baseline of the acceptance criterion.
* ``torchao-int8``: torchao's ``Int8DynamicActivationInt8WeightConfig`` when torchao is installed.
* ``fp16`` / ``bf16``: half-precision copies (``--device cuda``; ``bf16`` also on CPU with
  ``--half``).

Usage::

    PYTHONPATH=src python benchmarks/bench_int8.py                      # CPU, 2 threads
    PYTHONPATH=src python benchmarks/bench_int8.py --device cuda --batch 1 8 32
    PYTHONPATH=src python benchmarks/bench_int8.py --models deit_small_patch16_224 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import vitquant  # noqa: E402
from vitquant.quant import QuantConfig, calibrate, prepare  # noqa: E402
from vitquant.runtime import lower, lowering_report, weight_bytes  # noqa: E402
from vitquant.runtime.speed import time_alternating  # noqa: E402


def _variants(
    name: str, batch: int, device: torch.device, args: argparse.Namespace
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    torch.manual_seed(0)
    fp32 = vitquant.create_model(name).eval().to(device)
    out: dict[str, nn.Module] = {"fp32": fp32}
    info: dict[str, Any] = {}

    q = prepare(copy.deepcopy(fp32), QuantConfig(preset=args.preset, wbits=8, abits=8))
    calib = torch.randn(2, 3, 224, 224, device=device)
    calibrate(q, [calib], method="max", progress=False)
    example = torch.randn(batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        fake = q(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = lower(q, args.backend)
    with torch.inference_mode():
        diff = (int8(example) - fake).abs().max().item()
    info["int8_backend"] = lowering_report(int8)["backend"]
    info["int8_vs_fakequant_max_abs_logit_diff"] = diff
    info["fakequant_max_abs_logit"] = fake.abs().max().item()
    out["vitquant-int8"] = int8

    if device.type == "cpu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            out["quantize_dynamic"] = quantize_dynamic(
                copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8
            )
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        ao = copy.deepcopy(fp32)
        quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        out["torchao-int8"] = ao
    except Exception as e:  # noqa: BLE001 - optional peer, any failure just skips it
        info["torchao"] = f"skipped: {type(e).__name__}: {str(e)[:120]}"
    if device.type == "cuda" or args.half:
        out["bf16"] = copy.deepcopy(fp32).to(torch.bfloat16)
        if device.type == "cuda":
            out["fp16"] = copy.deepcopy(fp32).half()
    return out, info


def bench_one(name: str, batch: int, device: torch.device, args: argparse.Namespace) -> dict:
    models, info = _variants(name, batch, device, args)
    x = torch.randn(batch, 3, 224, 224, device=device)
    inputs = {k: x.to(next(m.parameters()).dtype) if k in ("bf16", "fp16") else x
              for k, m in models.items()}  # fmt: skip

    def call(k: str) -> Callable[[], Any]:
        return lambda: models[k](inputs[k])

    with torch.inference_mode():
        times = time_alternating({k: call(k) for k in models}, args.repeats, args.warmup, device)
    base = times["fp32"]
    res: dict[str, Any] = {"model": name, "batch": batch, "device": str(device), **info}
    res["variants"] = {}
    for k, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts)]
        res["variants"][k] = {
            "median_ms": statistics.median(ts) * 1e3,
            "speedup_vs_fp32": statistics.median(ratios),
            "weight_bytes": weight_bytes(models[k]) if k != "quantize_dynamic" else None,
            "times_ms": [t * 1e3 for t in ts],
        }
    if "quantize_dynamic" in times:
        ratios = [d / i for d, i in zip(times["quantize_dynamic"], times["vitquant-int8"])]
        res["int8_vs_quantize_dynamic"] = statistics.median(ratios)
        res["variants"]["quantize_dynamic"]["weight_bytes"] = _dynamic_bytes(
            models["quantize_dynamic"]
        )
    return res


def _dynamic_bytes(model: nn.Module) -> int:
    """Weight bytes of a ``quantize_dynamic`` model (int8 packed linears + float rest)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            total += w.numel() + (b.numel() * 4 if b is not None else 0)
            total += w.q_per_channel_scales().numel() * 4 if w.qscheme() in (
                torch.per_channel_affine, torch.per_channel_symmetric) else 8  # fmt: skip
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["deit_small_patch16_224", "vit_base_patch16_224"]
    )
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--preset", default="ft1")
    p.add_argument("--backend", default=None, help="onednn | intmm | reference (default: auto)")
    p.add_argument("--half", action="store_true", help="also time bf16 on CPU")
    p.add_argument("--json", default="benchmarks/results/bench_int8.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        for batch in args.batch:
            r = bench_one(name, batch, device, args)
            results.append(r)
            print(f"\n{name}  batch {batch}  ({device}, {torch.get_num_threads()} threads)")
            print(f"  {'variant':18s} {'median ms':>10s} {'vs fp32':>8s} {'weight MB':>10s}")
            for k, v in r["variants"].items():
                mb = v["weight_bytes"] / 2**20 if v["weight_bytes"] else float("nan")
                print(f"  {k:18s} {v['median_ms']:10.1f} {v['speedup_vs_fp32']:7.2f}x {mb:10.1f}")
            if "int8_vs_quantize_dynamic" in r:
                print(f"  vitquant-int8 vs quantize_dynamic: {r['int8_vs_quantize_dynamic']:.2f}x")
            print(f"  int8 vs fake-quant logits: max |diff| "
                  f"{r['int8_vs_fakequant_max_abs_logit_diff']:.3g} "
                  f"(max |logit| {r['fakequant_max_abs_logit']:.3g})")  # fmt: skip
            sys.stdout.flush()
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    os.replace(tmp, args.json)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

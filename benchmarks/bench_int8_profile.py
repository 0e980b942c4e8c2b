"""Where the time of a lowered int8 model goes: torch.profiler, ops grouped by role.

Lowers ``prepare(ft1 W8A8) -> calibrate`` of a model (random weights) and profiles a few eager
forward passes (after warm-up), then prints self CPU time per group of ops: int8 linears
(oneDNN), attention matmuls (``_int_mm`` per head, or the batched float matmul), softmax,
LayerNorm, quantization (``quantize_per_tensor`` + ``int_repr``, or the division chain),
conversions/copies and the rest, with the top ops. ``--compiled`` profiles
``torch.compile(model)`` instead (Inductor's fused loops appear as ``graph_*`` kernels).

Usage::

    PYTHONPATH=src python benchmarks/bench_int8_profile.py --model vit_base_patch16_224 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import vitquant  # noqa: E402
from vitquant.quant import QuantConfig, calibrate, prepare  # noqa: E402
from vitquant.runtime import lower, lowering_report  # noqa: E402

GROUPS = (
    ("int8 linear (oneDNN)", ("qlinear", "onednn_qlinear")),
    ("attention (native: q·kᵀ+softmax+quantize)", ("qk_softmax",)),
    ("attention (native: attn·v+quantize)", ("vnni_bmm_quant",)),
    ("attention matmuls", ("_int_mm", "int_mm_loop", "vnni_bmm", "aten::bmm", "aten::matmul")),
    ("softmax", ("softmax",)),
    ("layernorm", ("layer_norm",)),
    ("quantize", ("quantize_per_tensor", "int_repr", "round", "clamp", "div")),
    ("copies / conversions", ("copy_", "_to_copy", "contiguous", "clone")),
    ("rescale / add", ("aten::mul", "aten::add", "aten::sub")),
    ("patch embedding", ("convolution",)),
)


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return (
        "inductor fused loops" if name.startswith(("graph_", "cpp_fused", "kernel_")) else "other"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="lower(..., float_dtype=torch.bfloat16)")
    p.add_argument("--compiled", action="store_true")
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    q = prepare(vitquant.create_model(args.model).eval(), QuantConfig(preset="ft1"))
    calibrate(q, [torch.randn(2, 3, 224, 224)], method="max", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lower(q, float_dtype=torch.bfloat16 if args.bf16 else torch.float32)
    run = torch.compile(model) if args.compiled else model
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(2):
            run(x)
        with torch.profiler.profile() as prof:
            for _ in range(args.runs):
                run(x)
    per_group: dict[str, float] = defaultdict(float)
    ops = []
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / args.runs
        per_group[group_of(e.key)] += ms
        ops.append((ms, e.key, e.count // args.runs))
    total = sum(per_group.values())
    rep = lowering_report(model)
    how = f"attention {rep['attention']}, float {rep['float_dtype']}"
    how += ", compiled" if args.compiled else ""
    print(f"{args.model} b{args.batch}, {args.threads} threads, ISA {rep['isa']['level']}, {how}:")
    print(f"  {total:.1f} ms per forward (profiled)")
    for g, ms in sorted(per_group.items(), key=lambda kv: -kv[1]):
        print(f"  {g:42s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
    print("  top ops:")
    for ms, name, count in sorted(ops, reverse=True)[:10]:
        print(f"    {name[:44]:44s} {ms:8.1f} ms  x{count}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"total_ms": total, "groups": per_group, "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

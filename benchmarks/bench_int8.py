"""Int8 inference speed of vitquant against fair baselines, alternated in one process.

DeiT-S/16 and ViT-B/16 at 224 (random weights: speed does not depend on them), batch 1 and 8,
2 threads. Every torch variant of one (model, batch) runs in this process, alternated round by
round (A B C A B C ...); the script prints median times and the median of per-round ratios to
timm's fp32 model, and writes JSON (with the CPU's name and ISA flags) and a PNG bar chart.
OpenVINO int8 (NNCF) and onnxruntime run in processes of their own (``bench_int8_peers.py``:
their thread pools distort torch timings run beside them), each beside a timm fp32 run there.

Variants (``--variants`` picks a subset):

* ``timm-fp32``: timm's own model (fused SDPA attention): the fp32 reference of every ratio;
* ``vitquant-fp32``: vitquant's float model, eager;
* ``bf16`` / ``bf16-compiled``: timm's model in bfloat16, eager and ``torch.compile``;
* ``quantize_dynamic``: ``torch.ao.quantization.quantize_dynamic`` (int8 linears, float rest);
* ``torchao-int8`` / ``torchao-int8-compiled``: torchao's
  ``Int8DynamicActivationInt8WeightConfig``, eager and compiled (when torchao is installed);
* ``pt2e-x86-compiled``: torchao's PT2E flow with ``X86InductorQuantizer`` (static int8),
  compiled with Inductor freezing, calibrated on random images;
* ``vitquant-int8`` / ``vitquant-int8-compiled``: ``prepare(ft1 W8A8) -> calibrate -> lower``,
  eager and ``torch.compile``; ``vitquant-int8-bf16`` (``-compiled``): the same with
  ``lower(..., float_dtype=torch.bfloat16)``; ``vitquant-int8-loop-compiled``: compiled with
  the previous attention path forced (``lower(..., attention="loop")``: one ``torch._int_mm``
  per head on one thread, softmax in Inductor), to measure the native VNNI attention kernels;
  ``vitquant-int8-vnni-compiled`` / ``vitquant-int8-batched-compiled``: attention forced to
  the native kernels (the default on AVX512-VNNI and AMX CPUs) / to one exact batched bfloat16
  matmul (the AMX fallback), to compare them on a given CPU.

Usage::

    PYTHONPATH=src python benchmarks/bench_int8.py                       # everything, ~30 min
    PYTHONPATH=src python benchmarks/bench_int8.py --models vit_base_patch16_224 --batch 8 \\
        --variants timm-fp32 bf16 vitquant-int8 --repeats 5 --no-peers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from bench_int8_common import (  # noqa: E402
    machine,
    markdown_table,
    summarize,
    time_alternating,
    timm_fp32,
)

import vitquant  # noqa: E402
from vitquant.quant import QuantConfig, calibrate, prepare  # noqa: E402
from vitquant.runtime import lower, lowering_report  # noqa: E402

ALL = (
    "timm-fp32", "vitquant-fp32", "bf16", "bf16-compiled", "quantize_dynamic", "torchao-int8",
    "torchao-int8-compiled", "pt2e-x86-compiled", "vitquant-int8", "vitquant-int8-compiled",
    "vitquant-int8-bf16", "vitquant-int8-bf16-compiled", "vitquant-int8-loop-compiled",
    "vitquant-int8-vnni-compiled", "vitquant-int8-batched-compiled",
)  # fmt: skip
HERE = os.path.dirname(os.path.abspath(__file__))


def _vitquant_int8(
    name: str, float_dtype: torch.dtype, info: dict[str, Any], attention: str | None = None
) -> nn.Module:
    torch.manual_seed(0)
    q = prepare(vitquant.create_model(name).eval(), QuantConfig(preset="ft1", wbits=8, abits=8))
    calibrate(q, [torch.randn(2, 3, 224, 224)], method="max", progress=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        fake = q(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = lower(q, float_dtype=float_dtype, attention=attention)
    with torch.inference_mode():
        diff = (low(x) - fake).abs().max().item()
    rep = lowering_report(low)
    info[f"lowering_{rep['float_dtype']}_{rep['attention']}"] = {
        k: rep[k] for k in ("backend", "isa", "attention", "attention_note", "float_dtype")
    } | {"max_abs_logit_diff_vs_fakequant": diff, "max_abs_logit": fake.abs().max().item()}
    return low


def _torchao(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def _pt2e(model: nn.Module, batch: int) -> Callable[[torch.Tensor], Any]:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    x = torch.randn(batch, 3, 224, 224)
    exported = torch.export.export(model, (x,)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config()
    )
    prepared = prepare_pt2e(exported, quantizer)
    prepared(torch.randn(batch, 3, 224, 224))
    converted = convert_pt2e(prepared)
    compiled = torch.compile(converted)
    with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
        compiled(x)  # compiles now, with freezing (the x86 int8 path needs it)
    return compiled


def build(variant: str, name: str, batch: int, info: dict[str, Any]) -> Callable[[], Any]:
    """A zero-argument callable that runs one batch of ``variant``."""
    x = torch.randn(batch, 3, 224, 224)
    if variant == "timm-fp32":
        m: Any = timm_fp32(name)
    elif variant == "vitquant-fp32":
        torch.manual_seed(0)
        m = vitquant.create_model(name).eval()
    elif variant in ("bf16", "bf16-compiled"):
        m = timm_fp32(name).to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    elif variant == "quantize_dynamic":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = quantize_dynamic(timm_fp32(name), {nn.Linear}, dtype=torch.qint8)
    elif variant.startswith("torchao-int8"):
        m = _torchao(timm_fp32(name))
    elif variant == "pt2e-x86-compiled":
        m = _pt2e(timm_fp32(name), batch)
    elif variant.startswith("vitquant-int8"):
        dt = torch.bfloat16 if "-bf16" in variant else torch.float32
        forced = {"-loop": "loop", "-vnni": "vnni", "-batched": "batched-bf16"}
        att = next((v for k, v in forced.items() if k in variant), None)
        m = _vitquant_int8(name, dt, info, att)
    else:
        raise SystemExit(f"unknown variant {variant!r}; use some of {', '.join(ALL)}")
    if variant.endswith("-compiled") and variant != "pt2e-x86-compiled":
        m = torch.compile(m)
    t0 = time.perf_counter()
    with torch.inference_mode():
        m(x)  # first call: compilation for the compiled variants
    info.setdefault("first_call_s", {})[variant] = round(time.perf_counter() - t0, 2)

    def run() -> Any:
        with torch.inference_mode():
            return m(x)

    return run


def bench_one(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    # a fresh Dynamo cache per (model, batch): each lowered model's weight handles are constants
    # of its graph, and past torch._dynamo.config.recompile_limit (8) graphs of the same
    # forward Dynamo silently runs the model eagerly
    torch._dynamo.reset()
    info: dict[str, Any] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for v in ["timm-fp32"] + [v for v in args.variants if v != "timm-fp32"]:
        try:
            fns[v] = build(v, name, batch, info)
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
            info.setdefault("skipped", {})[v] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  skipped {v}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    times = time_alternating(fns, args.repeats, args.warmup)
    res = {"model": name, "batch": batch, **info, "variants": summarize(times, "timm-fp32")}
    v = res["variants"]
    pairs = ("vitquant-int8", "vitquant-int8-compiled", "vitquant-int8-bf16-compiled")
    for a, b in ((a, "bf16") for a in pairs):
        if a in times and b in times:
            ratios = [tb / ta for ta, tb in zip(times[a], times[b])]
            res[f"{a}_vs_{b}"] = sorted(ratios)[len(ratios) // 2]
    print(f"\n{name}  batch {batch}  ({torch.get_num_threads()} threads)")
    for k, r in v.items():
        print(f"  {k:28s} {r['median_ms']:9.1f} ms  {r['speedup_vs_timm_fp32']:6.2f}x timm fp32")
    for k in [k for k in res if k.endswith("_vs_bf16")]:
        print(f"  {k}: {res[k]:.2f}x")
    sys.stdout.flush()
    return res


def run_peers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``bench_int8_peers.py`` once per peer, each in its own process; its JSON lines."""
    out: list[dict[str, Any]] = []
    for peer in args.peers:
        cmd = [sys.executable, os.path.join(HERE, "bench_int8_peers.py"), "--peer", peer,
               "--models", *args.models, "--batch", *map(str, args.batch),
               "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--warmup", str(args.warmup)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        sys.stderr.write(proc.stderr[-2000:] if proc.returncode else "")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                out.append(rec)
                print(f"  [{peer} process] {rec.get('model')} b{rec.get('batch')}: "
                      f"{json.dumps(rec.get('variants', rec.get('skipped')))[:300]}")  # fmt: skip
    return out


def plot(
    results: list[dict[str, Any]],
    peers: list[dict[str, Any]],
    path: str,
    meta: dict[str, Any] | None = None,
) -> None:
    """Bar chart of speed-ups over timm fp32 (measured in the same process)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [(r["model"], r["batch"]) for r in results]
    rows: dict[str, list[float]] = {}
    for i, r in enumerate(results):
        extra = [p for p in peers if (p.get("model"), p.get("batch")) == configs[i]]
        merged = dict(r["variants"])
        for p in extra:
            merged.update({k: v for k, v in p.get("variants", {}).items() if k != "timm-fp32"})
        for k, v in merged.items():
            rows.setdefault(k, [float("nan")] * len(configs))[i] = v["speedup_vs_timm_fp32"]
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(configs)), 5))
    width = 0.8 / max(1, len(rows))
    for j, (k, vals) in enumerate(rows.items()):
        xs = [i + j * width for i in range(len(configs))]
        ax.bar(xs, vals, width, label=k, color=plt.cm.tab20(j % 20))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
    ax.set_xticklabels([f"{m.split('_patch')[0]}\nb{b}" for m, b in configs])
    ax.set_ylabel("speed-up over timm fp32 (same process)")
    meta = meta or machine()
    load = meta.get("loadavg", [float("nan")])[0]
    ax.set_title(
        f"int8 inference, {meta['cpu']} ({meta['isa']['level']}), {meta['threads']} threads, "
        f"load average {load:.1f}"
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["deit_small_patch16_224", "vit_base_patch16_224"]
    )
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--variants", nargs="+", default=list(ALL), choices=ALL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peers", nargs="*", default=["openvino", "onnxruntime"])
    p.add_argument("--no-peers", dest="peers", action="store_const", const=[])
    p.add_argument("--json", default="benchmarks/results/bench_int8.json")
    p.add_argument("--png", default=None, help="bar chart (default: --json's path, .png)")
    p.add_argument("--replot", default="", help="only redraw --png (and the table) from a JSON")
    args = p.parse_args(argv)
    if args.png is None:  # beside its JSON, so a run never overwrites another run's chart
        args.png = os.path.splitext(args.replot or args.json)[0] + ".png"
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        print(markdown_table(saved["results"], saved["peers"]))
        plot(saved["results"], saved["peers"], args.png, saved["meta"])
        return 0
    torch.set_num_threads(args.threads)
    meta = machine() | {"args": vars(args)}
    print(f"{meta['cpu']}  ISA {meta['isa']['level']}  flags {' '.join(meta['isa']['flags'])}")
    results = [bench_one(n, b, args) for n in args.models for b in args.batch]
    peers = run_peers(args) if args.peers else []
    meta["loadavg_after"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": results, "peers": peers}, f, indent=2)
    os.replace(tmp, args.json)
    print("\n" + markdown_table(results, peers))
    print(f"\nwrote {args.json}")
    if args.png:
        plot(results, peers, args.png, meta)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared pieces of the int8 benchmarks: timm import, machine description, alternated timing.

``bench_int8.py`` (torch variants, one process) and ``bench_int8_peers.py`` (OpenVINO / NNCF and
onnxruntime, each in a process of its own) both time timm's fp32 model beside their variants, so
that every figure is also a ratio to the same reference measured in the same process.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

_KEEP: list[object] = []


def import_timm() -> types.ModuleType:
    """timm on the CPU-only torch: torchvision 0.28 is a CUDA build whose import fails with
    "operator torchvision::nms does not exist"; defining its two op schemas first fixes it."""
    try:
        import timm

        return timm
    except (RuntimeError, ImportError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)
        for mod in [m for m in sys.modules if m.startswith(("timm", "torchvision"))]:
            del sys.modules[mod]
        import timm

        return timm


def timm_fp32(name: str) -> torch.nn.Module:
    """timm's own model (fused SDPA attention), random weights, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    return import_timm().create_model(name, pretrained=False).eval()


def machine() -> dict[str, Any]:
    """CPU name, ISA flags, the runtime's ISA level, torch version and load."""
    from vitquant.runtime.isa import cpu_isa, cpu_name

    isa = cpu_isa()
    ident: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("vendor_id", "cpu family", "model") and key.strip() not in ident:
                    ident[key.strip()] = value.strip()
                if len(ident) == 3:
                    break
    except OSError:
        pass
    return {
        "cpu": cpu_name() or platform.processor(),
        "cpu_id": ident,
        "cores": os.cpu_count(),
        "isa": isa.as_dict(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
    }


def time_alternating(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """``warmup`` untimed rounds, then ``repeats`` rounds of one call of each, in turn (A B C A B
    C ...): seconds per call."""
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]], base: str) -> dict[str, dict[str, Any]]:
    """Median ms per variant and the median of per-round ratios ``base / variant``."""
    out: dict[str, dict[str, Any]] = {}
    for k, ts in times.items():
        ratios = [b / t for b, t in zip(times[base], ts) if t > 0]
        out[k] = {
            "median_ms": statistics.median(ts) * 1e3,
            "speedup_vs_timm_fp32": statistics.median(ratios),
            "times_ms": [round(t * 1e3, 3) for t in ts],
        }
    return out


def markdown_table(results: list[dict[str, Any]], peers: list[dict[str, Any]]) -> str:
    """One row per variant, one column pair (ms, x timm fp32) per (model, batch); peers' rows
    carry the ratio to the timm fp32 run of their own process."""
    configs = [(r["model"], r["batch"]) for r in results]
    cells: dict[str, dict[int, str]] = {}
    for i, r in enumerate(results):
        merged = dict(r["variants"])
        for p in peers:
            if (p.get("model"), p.get("batch")) == configs[i]:
                for k, v in p.get("variants", {}).items():
                    key = k if k != "timm-fp32" else f"timm-fp32 ({p['peer']} process)"
                    merged[key] = v
        for k, v in merged.items():
            cells.setdefault(k, {})[i] = f"{v['median_ms']:.1f} | {v['speedup_vs_timm_fp32']:.2f}x"
    cols = [f"{m.split('_patch')[0]} b{b} ms | x fp32" for m, b in configs]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---|" + "---|---|" * len(configs)]
    for k, row in cells.items():
        vals = " | ".join(row.get(i, "- | -") for i in range(len(configs)))
        lines.append(f"| {k} | {vals} |")
    return "\n".join(lines)

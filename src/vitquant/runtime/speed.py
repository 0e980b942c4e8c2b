"""Latency and weight-memory measurement of a float model against its int8 version.

:func:`measure_speedup` alternates the two models in one process (A B A B ...) and reports
medians and the median ratio, because absolute times on shared machines drift by 2x within a
session (see ``docs/int8.md``). Used by ``make demo`` and ``benchmarks/bench_int8.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.runtime.kernels import PackedWeight

__all__ = ["measure_speedup", "time_alternating", "weight_bytes"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    fns: dict[str, Callable[[], Any]],
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Runs every callable ``warmup`` times, then ``repeats`` rounds of one call each, in turn.

    Returns:
        ``{name: [seconds per call, ...]}``.
    """
    dev = torch.device(device)
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            fn()
    _sync(dev)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    return times


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's weights: parameters, buffers and int8 packed weights.

    Int8 weights count one byte per code plus their float32 scales (the oneDNN prepacked copy
    is the same data in another layout and is not counted twice).
    """
    total = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, PackedWeight) and id(v) not in seen:
                seen.add(id(v))
                total += v.codes.numel() + v.scale.numel() * 4
    return total


def measure_speedup(
    float_model: nn.Module,
    int8_model: nn.Module,
    example: Tensor,
    repeats: int = 10,
    warmup: int = 2,
) -> dict[str, float]:
    """Median latency of both models on ``example``, alternated in one process.

    Args:
        float_model: the baseline (fp32 eager).
        int8_model: the lowered model.
        example: one input batch.
        repeats: timed calls per model.
        warmup: untimed calls per model first.

    Returns:
        ``{"float_ms", "int8_ms", "speedup", "float_weight_bytes", "int8_weight_bytes",
        "batch", "repeats"}``; ``speedup`` is the median of the per-round ratios.
    """
    float_model.eval()
    int8_model.eval()
    with torch.inference_mode():
        times = time_alternating(
            {"float": lambda: float_model(example), "int8": lambda: int8_model(example)},
            repeats,
            warmup,
            example.device,
        )
    ratios = [f / i for f, i in zip(times["float"], times["int8"]) if i > 0]
    return {
        "float_ms": statistics.median(times["float"]) * 1e3,
        "int8_ms": statistics.median(times["int8"]) * 1e3,
        "speedup": statistics.median(ratios) if ratios else float("nan"),
        "float_weight_bytes": float(weight_bytes(float_model)),
        "int8_weight_bytes": float(weight_bytes(int8_model)),
        "batch": float(example.shape[0]),
        "repeats": float(repeats),
    }

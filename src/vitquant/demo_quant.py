"""The demo's quantization rows: PTQ W8A8 (ft1, ft2), W4A4 (plain min-max vs the ViT-specific
quantizers), the packed export's true size, and the int8 runtime's speed-up.

Each step reuses the float model that the ``float`` step of :mod:`vitquant.demo` trained (or
found cached) and evaluates on the full Fashion-MNIST test set.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from .demo import DemoContext, DemoRow, register_demo_step

__all__: list[str] = []

#: (row name, preset, bits, calibrator)
PTQ_ROWS = (
    ("PTQ W8A8 ft1", "ft1", 8, "percentile"),
    ("PTQ W8A8 ft2", "ft2", 8, "percentile"),
    ("PTQ W4A4 min-max", "ft1", 4, "max"),
    ("PTQ W4A4 ViT-specific", "repq", 4, "mse"),
)


def _float_model(ctx: DemoContext) -> nn.Module:
    from .models import create_model

    cfg = ctx.artifacts["float_config"]
    return create_model(cfg.model, checkpoint_path=str(ctx.artifacts["float_best"])).eval()


def _evaluate(ctx: DemoContext, model: nn.Module) -> dict[str, float]:
    from .train.evaluation import evaluate_model_on

    return evaluate_model_on(model, ctx.config.data_path, "test", device="cpu")


def _calib_batches(ctx: DemoContext, n: int = 320, batch: int = 32) -> list[Any]:
    from .data import build_dataset, subset

    ds = subset(build_dataset(ctx.config.data_path, "train", train_transform=False), n, seed=0)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    return [xs[i : i + batch] for i in range(0, len(xs), batch)]


def _size_mb(model: nn.Module) -> tuple[float, float]:
    from .export.io import model_size_report

    rep = model_size_report(model)
    return rep["quantized_bytes"] / 2**20, rep["compression"]


@register_demo_step("ptq")
def ptq_rows(ctx: DemoContext) -> list[DemoRow]:
    """Calibrates the float model with each :data:`PTQ_ROWS` config and evaluates it."""
    from .quant import QuantConfig, calibrate, prepare

    base = _float_model(ctx)
    calib = _calib_batches(ctx)
    rows = []
    for name, preset, bits, method in PTQ_ROWS:
        t0 = time.monotonic()
        model = prepare(copy.deepcopy(base), QuantConfig(preset, wbits=bits, abits=bits))
        calibrate(model, calib, method=method, progress=False)
        res = _evaluate(ctx, model)
        size, ratio = _size_mb(model)
        ctx.artifacts[f"ptq:{name}"] = model
        rows.append(
            DemoRow(
                name,
                float(res["top1"]),
                float(res["top5"]),
                size,
                time.monotonic() - t0,
                f"{preset}, {method}, {ratio:.1f}x smaller",
            )
        )
    return rows


@register_demo_step("int8")
def int8_row(ctx: DemoContext) -> DemoRow:
    """Lowers the W8A8 ft1 model to int8 kernels; accuracy and speed-up over float32 eager."""
    from .runtime import lower, measure_speedup

    fq = ctx.artifacts.get("ptq:PTQ W8A8 ft1")
    if fq is None:
        raise RuntimeError("the int8 step needs the ptq step")
    int8 = lower(copy.deepcopy(fq))
    res = _evaluate(ctx, int8)
    example = _calib_batches(ctx, n=64, batch=64)[0]
    speed = measure_speedup(_float_model(ctx), int8, example, repeats=10)
    size, _ = _size_mb(fq)
    return DemoRow(
        "int8 runtime W8A8 ft1",
        float(res["top1"]),
        float(res["top5"]),
        size,
        None,
        f"{speed['speedup']:.2f}x vs float32 (batch 64, {torch.get_num_threads()} threads)",
    )

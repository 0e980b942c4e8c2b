"""The demo's post-training quantization rows: PTQ W8A8 (FasterTransformer's ft1 and ft2 with
the percentile calibrator, and vitquant's default ``robust`` preset with SmoothQuant, Xiao et
al., 2023, arXiv 2211.10438), and W4A4 with plain min-max ranges against the ViT-specific
quantizers (RepQ-ViT: log-sqrt2 softmax quantizer and LayerNorm reparameterisation; Li et al.,
2023, arXiv 2212.08254) and the ``lowbit`` recipe (searched SmoothQuant, output-MSE ranges and
BRECQ / AdaRound block reconstruction).

Each row calibrates the float model that the ``float`` step of :mod:`vitquant.demo` trained (or
found cached) on 320 training images and evaluates it on the demo's test images. The calibrated
models stay in :attr:`DemoContext.artifacts` as ``"model:<row name>"`` (the int8 row lowers the
W8A8 ft1 one).
"""

from __future__ import annotations

import copy
import time

from vitquant.demo.main import DemoContext, DemoRow, register_demo_step
from vitquant.demo.utils import calib_batches, evaluate, float_model, size_fields, true_size

__all__ = ["PTQ_ROWS"]

#: (row name, preset, bits, calibrator (None: the preset's), note)
PTQ_ROWS: tuple[tuple[str, str, int, str | None, str], ...] = (
    ("PTQ W8A8 ft1", "ft1", 8, "percentile", "ft1: GEMM inputs, per-channel weights; percentile"),
    ("PTQ W8A8 ft2", "ft2", 8, "percentile", "ft2: + softmax input, GEMM outputs; percentile"),
    ("PTQ W8A8 default", "robust", 8, None, "the default preset: ft1 + SmoothQuant (LN, fc2)"),
    ("PTQ W4A4 min-max", "ft1", 4, "max", "ft1, min-max ranges (the baseline)"),
    ("PTQ W4A4 ViT-specific", "repq", 4, "mse", "RepQ-ViT: log-sqrt2 softmax, LN reparam, mse"),
    (
        "PTQ W4A4 lowbit",
        "lowbit",
        4,
        None,
        "lowbit: searched SmoothQuant, output-MSE ranges, block reconstruction",
    ),
)


@register_demo_step("ptq")
def ptq_rows(ctx: DemoContext) -> list[DemoRow]:
    """Calibrates the float model with each :data:`PTQ_ROWS` config and evaluates it."""
    from vitquant.quant import QuantConfig, calibrate, prepare

    base = float_model(ctx)
    calib = calib_batches(ctx)
    rows = []
    for name, preset, bits, method, note in PTQ_ROWS:
        t0 = time.monotonic()
        model = prepare(copy.deepcopy(base), QuantConfig(preset, wbits=bits, abits=bits))
        calibrate(model, calib, method=method, progress=False)
        res = evaluate(ctx, model)
        ctx.artifacts[f"model:{name}"] = model
        rows.append(
            DemoRow(
                name,
                float(res["top1"]),
                float(res["top5"]),
                seconds=time.monotonic() - t0,
                note=note,
                bits=f"{bits}/{bits}",
                **size_fields(ctx, true_size(model)),
            )
        )
        ctx.say(f"  {name}: top-1 {rows[-1].top1:.2f}%")
    return rows

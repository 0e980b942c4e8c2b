"""PTQ experiments as library calls: one calibration run (:func:`run_ptq`) and a sweep over configs
(:func:`ptq_sweep`, :func:`ptq_grid`) producing the rows of the results table in ``docs/ptq.md``.

The protocol is FasterTransformer's ViT PTQ (``main.py --calib``): calibrate on a few training
batches, evaluate float and quantized on the validation split.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from vitquant.quant.api import calibrate, prepare
from vitquant.quant.config import QuantConfig

__all__ = ["run_ptq", "ptq_sweep", "ptq_grid", "config_label"]


def config_label(cfg: QuantConfig) -> str:
    """Short label: ``W8A8 ft2 percentile(99.99)`` plus ViT-specific options when set."""
    c = cfg.effective_calibrator
    cal = c + (f"({cfg.percentile:g})" if c == "percentile" else "")
    parts = [f"W{cfg.wbits}A{cfg.abits}", cfg.preset, cal]
    if cfg.effective_softmax_quantizer != "uniform":
        parts.append(f"softmax={cfg.effective_softmax_quantizer}")
    if cfg.effective_ln_reparam:
        parts.append("ln_reparam")
    return " ".join(parts)


def run_ptq(
    model: nn.Module,
    config: QuantConfig,
    calib_data: Iterable[Any],
    evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    *,
    num_batches: int | None = None,
    device: Any = None,
    progress: bool = True,
    copy_model: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prepares, calibrates (with ``config.calibrator``/``percentile``) and evaluates one model.

    Args:
        model: the float model (copied unless ``copy_model=False``).
        config: the quantization config.
        calib_data: calibration batches.
        evaluate_fn: ``model -> {"top1": ..., ...}``; None skips evaluation.
        num_batches: calibration batches to use.
        device: calibration device.
        progress: progress bar.
        copy_model: quantize a deep copy (the float model stays usable).

    Returns:
        ``(quantized model, row)`` where ``row`` holds the config, its label, the metrics and the
        calibration time in seconds.
    """
    qmodel = copy.deepcopy(model) if copy_model else model
    prepare(qmodel, config)
    t0 = time.perf_counter()
    calibrate(qmodel, calib_data, num_batches=num_batches, device=device, progress=progress)
    row: dict[str, Any] = {
        "label": config_label(config),
        "config": config.to_dict(),
        "calib_seconds": round(time.perf_counter() - t0, 2),
    }
    if evaluate_fn is not None:
        row.update(evaluate_fn(qmodel))
    return qmodel, row


def ptq_sweep(
    model: nn.Module,
    configs: Sequence[QuantConfig],
    calib_data: Iterable[Any],
    evaluate_fn: Callable[[nn.Module], dict[str, float]],
    *,
    num_batches: int | None = None,
    device: Any = None,
    progress: bool = False,
    include_float: bool = True,
) -> list[dict[str, Any]]:
    """Evaluates the float model and each config's PTQ model; returns one row per run.

    ``calib_data`` must be re-iterable (a DataLoader or a list), since each config calibrates from
    the same batches.
    """
    rows: list[dict[str, Any]] = []
    if include_float:
        rows.append({"label": "float", "config": None, **evaluate_fn(model)})
    for cfg in configs:
        _, row = run_ptq(
            model,
            cfg,
            calib_data,
            evaluate_fn,
            num_batches=num_batches,
            device=device,
            progress=progress,
        )
        rows.append(row)
    return rows


def ptq_grid(
    presets: Sequence[str] = ("ft1", "ft2", "ft3"),
    calibrators: Sequence[str] = ("max", "percentile", "mse", "entropy"),
    low_bits: Sequence[int] = (6, 4),
    percentile: float = 99.99,
) -> list[QuantConfig]:
    """The configs of the results table: W8A8 for each preset and calibrator, then for each low
    bit width the plain min-max baseline (ft1, max), ft1 with percentile, and the ViT-specific
    PTQ (``repq``: log-sqrt2 softmax, LayerNorm reparameterisation, asymmetric activations)."""
    out = [
        QuantConfig(p, wbits=8, abits=8, calibrator=c, percentile=percentile)
        for p in presets
        for c in calibrators
    ]
    for b in low_bits:
        out.append(QuantConfig("ft1", wbits=b, abits=b, calibrator="max"))
        out.append(QuantConfig("ft1", wbits=b, abits=b, calibrator="percentile"))
        out.append(QuantConfig("repq", wbits=b, abits=b, calibrator="percentile"))
        out.append(QuantConfig("repq", wbits=b, abits=b, calibrator="mse"))
    return out

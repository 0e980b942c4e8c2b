"""The demo's deployment rows: the packed export of a W4 model and the int8 runtime.

* ``export``: writes the QAT W4A4 LSQ model (else the PTQ W4A4 ViT-specific one) with
  :func:`vitquant.save_quantized` (bit-packed codes in safetensors + a JSON header; DiffQ's
  ``get_quantized_state(packed=True)`` idea, arXiv 2104.09987), reports the file's size against
  the true size, reloads it with :func:`vitquant.load_quantized` and checks that the reloaded
  model gives the same logits, then evaluates the reloaded model;
* ``int8``: lowers the PTQ W8A8 ft1 model to integer kernels (:func:`vitquant.runtime.lower`),
  evaluates it and measures its latency against float32 eager, alternating the two in one
  process (:func:`vitquant.runtime.measure_speedup`, medians of the per-round ratios). The demo
  model's GEMMs (width 64) are too small for int8 to pay off, so outside quick mode the step also
  times a DeiT-S-shaped model (random weights, calibrated on noise: latency only), where the
  GEMMs are those of a real ViT.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from vitquant.demo.main import DemoContext, DemoRow, register_demo_step
from vitquant.demo.utils import calib_batches, evaluate, float_model, size_fields

__all__ = ["EXPORT_SOURCES", "SPEED_BATCH", "SPEED_REPEATS", "large_model_speedup"]

#: rows whose model the export step writes, the first one present
EXPORT_SOURCES = ("QAT W4A4 LSQ", "PTQ W4A4 ViT-specific")
#: images per timed call and timed calls per model of the int8 speed-up
SPEED_BATCH = 64
SPEED_REPEATS = 10
#: the ViT-sized latency check of the int8 step: model, batch, timed calls
LARGE_SPEED_MODEL = "deit_small_patch16_224"
LARGE_SPEED_BATCH = 8
LARGE_SPEED_REPEATS = 5


@register_demo_step("export")
def export_row(ctx: DemoContext) -> DemoRow:
    """Writes, reloads and checks the packed file of a W4 model."""
    from vitquant.export.io import load_quantized, save_quantized, size_report

    source = next((s for s in EXPORT_SOURCES if f"model:{s}" in ctx.artifacts), None)
    if source is None:
        raise RuntimeError("the export step needs the qat-lsq or the ptq step")
    model = ctx.artifacts[f"model:{source}"]
    t0 = time.monotonic()
    slug = source.lower().replace(" ", "_").replace("-", "")
    path = save_quantized(model, Path(ctx.config.output) / "export" / f"{slug}.safetensors")
    rep = size_report(path)
    reloaded = load_quantized(path)
    x = calib_batches(ctx, 64, 64)[0]
    with torch.no_grad():
        a, b = model.eval()(x), reloaded(x)
    same = torch.equal(a, b)
    diff = float((a - b).abs().max())
    check = "reload identical" if same else f"reload differs (max |Δlogit| {diff:.2e})"
    res = evaluate(ctx, reloaded)
    ctx.artifacts["export_path"] = path
    file_mb = rep["file_bytes"] / 2**20
    true_mb = rep["quantized_bytes"] / 2**20
    return DemoRow(
        f"export ({source})",
        float(res["top1"]),
        float(res["top5"]),
        seconds=time.monotonic() - t0,
        note=f"{path.name}: file {file_mb:.3f} MiB = {rep['file_vs_quantized']:.2f}x true size "
        f"{true_mb:.3f} MiB; {check}",
        bits=next((r.bits for r in ctx.rows if r.name == source), ""),
        **size_fields(ctx, file_mb),
    )


@register_demo_step("int8")
def int8_row(ctx: DemoContext) -> DemoRow:
    """Lowers the W8A8 ft1 model to int8 kernels; accuracy and speed-up over float32 eager."""
    from vitquant.export.io import model_size_report
    from vitquant.runtime import lower, measure_speedup

    fq = ctx.artifacts.get("model:PTQ W8A8 ft1")
    if fq is None:
        raise RuntimeError("the int8 step needs the ptq step")
    t0 = time.monotonic()
    int8 = lower(copy.deepcopy(fq))
    res = evaluate(ctx, int8)
    example = calib_batches(ctx, n=SPEED_BATCH, batch=SPEED_BATCH)[0]
    speed = measure_speedup(float_model(ctx), int8, example, repeats=SPEED_REPEATS)
    size = model_size_report(fq)["quantized_bytes"] / 2**20
    threads = torch.get_num_threads()
    note = (
        f"{speed['speedup']:.2f}x vs float32 eager (batch {SPEED_BATCH}, {threads} threads, "
        f"median of {SPEED_REPEATS})"
    )
    if not ctx.config.quick:
        ctx.say(f"  timing int8 on a {LARGE_SPEED_MODEL}-shaped model (latency only)")
        big = large_model_speedup()
        ctx.artifacts["int8_large_speedup"] = big
        note += (
            f"; {LARGE_SPEED_MODEL} shape: {big['speedup']:.2f}x ({big['float_ms']:.0f} -> "
            f"{big['int8_ms']:.0f} ms, batch {LARGE_SPEED_BATCH})"
        )
    return DemoRow(
        "int8 runtime W8A8 ft1",
        float(res["top1"]),
        float(res["top5"]),
        seconds=time.monotonic() - t0,
        note=note,
        bits="8/8",
        speedup=float(speed["speedup"]),
        **size_fields(ctx, size),
    )


def large_model_speedup(
    model: str = LARGE_SPEED_MODEL,
    batch: int = LARGE_SPEED_BATCH,
    repeats: int = LARGE_SPEED_REPEATS,
) -> dict[str, float]:
    """int8 against float32 latency of a randomly initialised ``model`` (W8A8 ft1, percentile
    ranges from two batches of noise): the speed of ViT-sized GEMMs, not an accuracy."""
    from vitquant.models import create_model
    from vitquant.quant import QuantConfig, calibrate, prepare
    from vitquant.runtime import lower, measure_speedup
    from vitquant.train.data import model_img_size

    gen = torch.Generator().manual_seed(0)
    net = create_model(model).eval()
    size = model_img_size(net) or 224
    chans = net.patch_embed.proj.in_channels
    noise = [torch.randn(batch, chans, size, size, generator=gen) for _ in range(2)]
    fq = prepare(copy.deepcopy(net), QuantConfig(preset="ft1", wbits=8, abits=8))
    calibrate(fq, noise, num_batches=2, progress=False)
    return measure_speedup(net, lower(fq), noise[0], repeats=repeats)

"""Cost of histogram calibration relative to a plain forward pass (target: < 2x).

Runs the same batches through a ViT twice per repeat, alternating the order (A B, B A, ...):
plain ``model(x)`` under ``torch.no_grad``, and ``run_calibration`` where forward pre-hooks feed
every input of every quantizable op (``Linear``, ``Conv2d``, ``MatMul``, ``Add``, ``Softmax``,
``LayerNorm``, ``GELU``) to its own ``HistogramCalibrator`` (2048 bins), as FasterTransformer's
calibration does. Prints medians and the ratio, and the time to read all amaxes per method.

``run_calibration(model, batches)`` is the one function to swap for ``vitquant.quant.calibrate``
once it exists.

Example:
    PYTHONPATH=src python benchmarks/bench_calibration.py --model vit_tiny_patch16_224 \\
        --batches 4 --batch-size 8 --repeats 5 --out bench_calibration.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.quant.calibrators import CALIBRATION_METHODS, Calibrator, HistogramCalibrator

try:
    from vitquant.models.layers import Add, MatMul

    _OPS: tuple[type[nn.Module], ...] = (Add, MatMul)
except ImportError:  # pragma: no cover - models not importable
    _OPS = ()
QUANTIZABLE = (nn.Linear, nn.Conv2d, nn.Softmax, nn.LayerNorm, nn.GELU, *_OPS)


def build_model(name: str) -> nn.Module:
    """A vitquant model by name, or a stand-in stack of Linear+GELU layers if that fails."""
    try:
        from vitquant import create_model

        return create_model(name).eval()
    except Exception as e:  # noqa: BLE001 - benchmark fallback, reported
        print(f"create_model({name!r}) failed ({e}); using a Linear+GELU stack")
        layers: list[nn.Module] = []
        for _ in range(6):  # ViT-Tiny-sized MLP blocks over 196 tokens
            layers += [nn.LayerNorm(192), nn.Linear(192, 768), nn.GELU(), nn.Linear(768, 192)]
        model = nn.Sequential(*layers).eval()
        model.input_shape = (196, 192)  # type: ignore[assignment]
        return model


def run_calibration(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, Calibrator]:
    """Forwards ``batches`` collecting every quantizable op's inputs; returns the calibrators."""
    cals: dict[str, Calibrator] = {}
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            for i, a in enumerate(args):
                if isinstance(a, Tensor) and a.is_floating_point():
                    key = f"{name}.input{i}"
                    if key not in cals:
                        cals[key] = HistogramCalibrator()
                    cals[key].collect(a)

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, QUANTIZABLE):
            handles.append(mod.register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return cals


def run_plain(model: nn.Module, batches: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for x in batches:
            model(x)


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    if hasattr(model, "input_shape"):
        return tuple(model.input_shape)
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", 224)
    size = size if isinstance(size, (tuple, list)) else (size, size)
    chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
    return (chans, *size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_json(path: str, data: dict[str, Any]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.model).to(device)
    shape = _input_shape(model)
    batches = [torch.randn(args.batch_size, *shape, device=device) for _ in range(args.batches)]

    run_plain(model, batches[:1])  # warm-up
    cals = run_calibration(model, batches[:1])
    # wall time, and process CPU time (steadier on a shared machine)
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "calib": []}
    for r in range(args.repeats):
        for which in ("plain", "calib") if r % 2 == 0 else ("calib", "plain"):
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            if which == "plain":
                run_plain(model, batches)
            else:
                cals = run_calibration(model, batches)
            _sync(device)
            times[which].append((time.perf_counter() - t, time.process_time() - c))
    plain, calib = [w for w, _ in times["plain"]], [w for w, _ in times["calib"]]
    plain_cpu, calib_cpu = [c for _, c in times["plain"]], [c for _, c in times["calib"]]
    read = {}
    for method in CALIBRATION_METHODS:
        t = time.perf_counter()
        for c in cals.values():
            c.compute_amax(method)
        read[method] = time.perf_counter() - t

    res = {
        "model": args.model,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "calibrators": len(cals),
        "plain_median_s": statistics.median(plain),
        "calib_median_s": statistics.median(calib),
        "ratio_calib_over_plain": statistics.median(c / p for c, p in zip(calib, plain)),
        "plain_cpu_median_s": statistics.median(plain_cpu),
        "calib_cpu_median_s": statistics.median(calib_cpu),
        "ratio_cpu_time": statistics.median(c / p for c, p in zip(calib_cpu, plain_cpu)),
        "device": str(device),
        "read_all_amax_s": read,
    }
    print(
        f"{args.model} on {device}: {args.batches} x {args.batch_size} images, "
        f"{len(cals)} calibrators, {torch.get_num_threads()} threads"
    )
    print(f"plain forward   median {res['plain_median_s'] * 1e3:9.1f} ms")
    print(f"with histograms median {res['calib_median_s'] * 1e3:9.1f} ms")
    print(f"ratio (median of paired ratios) {res['ratio_calib_over_plain']:.2f}x  (target < 2x)")
    print(f"process CPU time ratio          {res['ratio_cpu_time']:.2f}x")
    for m, t in read.items():
        print(f"read amax, {m:10s} {t * 1e3:8.1f} ms for all {len(cals)} calibrators")
    if args.out:
        _write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()

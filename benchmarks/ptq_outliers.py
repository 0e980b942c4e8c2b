"""PTQ recipes on models with activation outliers: top-1 drop against float, per model and recipe.

No pretrained ViT is reachable here, so the real-model case of the PTQ issue is built: the demo's
float model (``make demo``: ``vit_micro_patch7_28`` on Fashion-MNIST) and copies of it with
function-preserving outlier injection (:mod:`vitquant.models.outliers`): post-LayerNorm channel
outliers (``ln``), one massive post-GELU channel per block (``gelu``), massive tokens in the
residual stream (``tokens``) and all three (``all``). Each recipe calibrates on the same training
images and is evaluated on the same test images; the float row of each model is its own.

Example (after ``make demo``, which trains the float model into ``runs/demo/float``):
    PYTHONPATH=src python benchmarks/ptq_outliers.py --kinds none ln gelu tokens all \\
        --out benchmarks/results/ptq_outliers.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import vitquant
from vitquant._atomic import atomic_write_json
from vitquant.data import build_dataset, subset
from vitquant.models.outliers import inject_outliers
from vitquant.quant import QuantConfig, calibrate, prepare

Recipe = Callable[[nn.Module, list[Tensor]], nn.Module]


def _ptq(config: QuantConfig, **calib: Any) -> Recipe:
    def run(model: nn.Module, batches: list[Tensor]) -> nn.Module:
        q = prepare(copy.deepcopy(model), config)
        calibrate(q, batches, progress=False, **calib)
        return q

    return run


def _fallback(bits: int, max_drop: float, val: list[tuple[Tensor, Tensor]]) -> Recipe:
    """``lowbit`` at ``bits`` with the accuracy-driven fallback on held-out labelled images, as
    ``vitquant calibrate --max-drop`` runs it (:func:`fallback_with_reconstruction`): the
    reconstructed model if it meets the budget on ``val``; else fallback (8-bit layers) without
    reconstruction, reconstruction, then each raised layer tried back at ``bits``."""

    def run(model: nn.Module, batches: list[Tensor]) -> nn.Module:
        from vitquant.methods.ptq.fallback_reconstructed import fallback_with_reconstruction

        cfg = QuantConfig("lowbit", bits, bits, pass_options={"reconstruct": {"progress": False}})
        res = fallback_with_reconstruction(model, cfg, batches, val, max_drop=max_drop)
        LAST_FALLBACK[:] = res.raised
        LOWERED[:] = res.lowered
        return res.model

    return run


LOWBIT_BC = ["smooth", "output_mse", "reconstruct", "bias_correct"]
LAST_FALLBACK: list[str] = []  # the layers the last fallback recipe kept at 8 bits
LOWERED: list[str] = []  # those it raised, then returned to low bits after reconstruction


def recipes(val: list[tuple[Tensor, Tensor]]) -> dict[str, tuple[str, Recipe]]:
    """``{name: (what it is, recipe)}``: the seed's presets, then vitquant's robust ones."""
    quiet = {"reconstruct": {"progress": False}}
    FISHER = {"reconstruct": {"progress": False, "loss": "fisher"}}  # noqa: N806
    FISHER05 = {"reconstruct": {"progress": False, "loss": "fisher", "fisher_mix": 0.5}}  # noqa: N806
    SEED1 = {"reconstruct": {"progress": False, "seed": 1}}  # noqa: N806
    FISHER_SEED1 = {"reconstruct": {**FISHER["reconstruct"], "seed": 1}}  # noqa: N806
    ASYM = {"linear_input": {"symmetric": False}}  # noqa: N806
    return {
        "ft1-w8a8": ("FT mode 1, percentile 99.99", _ptq(QuantConfig("ft1", 8, 8))),
        "ft2-w8a8": ("FT mode 2, percentile 99.99", _ptq(QuantConfig("ft2", 8, 8))),
        "default-w8a8": ("QuantConfig(wbits=8, abits=8): the robust preset, SmoothQuant 0.5",
                         _ptq(QuantConfig(wbits=8, abits=8))),
        "default-search-w8a8": ("robust preset, SmoothQuant alpha searched per layer",
                                _ptq(QuantConfig(wbits=8, abits=8,
                                                 pass_options={"smooth": {"alpha": "search"}}))),
        "default-bc-w8a8": ("robust preset + bias correction",
                            _ptq(QuantConfig(wbits=8, abits=8, passes=["smooth", "bias_correct"]))),
        "repq-w6a6": ("RepQ-ViT, mse", _ptq(QuantConfig("repq", 6, 6, calibrator="mse"))),
        "lowbit-w6a6": ("lowbit preset: mse, searched SmoothQuant, output_mse, reconstruction",
                        _ptq(QuantConfig("lowbit", 6, 6, pass_options=quiet))),
        "repq-w4a4": ("RepQ-ViT, mse", _ptq(QuantConfig("repq", 4, 4, calibrator="mse"))),
        "lowbit-w4a4": ("lowbit preset: mse, searched SmoothQuant, output_mse, reconstruction",
                        _ptq(QuantConfig("lowbit", 4, 4, pass_options=quiet))),
        "lowbit-log2-w4a4": ("lowbit with RepQ-ViT's log-sqrt2 softmax quantizer",
                             _ptq(QuantConfig("lowbit", 4, 4, softmax_quantizer="log2_sqrt2",
                                              pass_options=quiet))),
        "lowbit-asym-w4a4": ("lowbit with asymmetric activations (RepQ-ViT's)",
                             _ptq(QuantConfig("lowbit", 4, 4, act_symmetric=False,
                                              pass_options=quiet))),
        "lowbit-log2-asym-w4a4": ("lowbit with log-sqrt2 softmax and asymmetric activations",
                                  _ptq(QuantConfig("lowbit", 4, 4, softmax_quantizer="log2_sqrt2",
                                                   act_symmetric=False, pass_options=quiet))),
        "lowbit-p8-w4a4": ("lowbit with 8-bit uniform attention probabilities (softmax_bits=8)",
                           _ptq(QuantConfig("lowbit", 4, 4, softmax_bits=8, pass_options=quiet))),
        "lowbit-fisher-w4a4": ("lowbit, Fisher-weighted reconstruction (BRECQ)",
                               _ptq(QuantConfig("lowbit", 4, 4, pass_options=FISHER))),
        "lowbit-w3a3": ("lowbit preset at 3 bits",
                        _ptq(QuantConfig("lowbit", 3, 3, pass_options=quiet))),
        "lowbit-fisher-w3a3": ("lowbit at 3 bits, Fisher-weighted reconstruction (BRECQ)",
                               _ptq(QuantConfig("lowbit", 3, 3, pass_options=FISHER))),
        "lowbit-fisher-mix05-w3a3": ("lowbit at 3 bits, Fisher weights blended 1:1 with MSE's",
                                     _ptq(QuantConfig("lowbit", 3, 3, pass_options=FISHER05))),
        "lowbit-seed1-w3a3": ("lowbit at 3 bits, reconstruction seed 1 (its sampling noise)",
                              _ptq(QuantConfig("lowbit", 3, 3, pass_options=SEED1))),
        "lowbit-fisher-seed1-w3a3": ("lowbit at 3 bits, Fisher-weighted, reconstruction seed 1",
                                     _ptq(QuantConfig("lowbit", 3, 3, pass_options=FISHER_SEED1))),
        "repq-w3a3": ("RepQ-ViT, mse", _ptq(QuantConfig("repq", 3, 3, calibrator="mse"))),
        "lowbit-bc-w4a4": ("lowbit + bias correction after the reconstruction",
                           _ptq(QuantConfig("lowbit", 4, 4, passes=LOWBIT_BC, pass_options=quiet))),
        "repq-bc-w4a4": ("RepQ-ViT, mse + bias correction",
                         _ptq(QuantConfig("repq", 4, 4, calibrator="mse",
                                          passes=["bias_correct"]))),
        "dynamic-w8a8": ("robust preset, per-token dynamic Linear inputs (act_dynamic)",
                         _ptq(QuantConfig(wbits=8, abits=8, act_dynamic=True))),
        "lowbit-dynamic-w6a6": ("lowbit preset, per-token dynamic Linear inputs",
                                _ptq(QuantConfig("lowbit", 6, 6, act_dynamic=True,
                                                 pass_options=quiet))),
        "lowbit-dynamic-w4a4": ("lowbit preset, per-token dynamic Linear inputs",
                                _ptq(QuantConfig("lowbit", 4, 4, act_dynamic=True,
                                                 pass_options=quiet))),
        "lowbit-dynamic-w3a3": ("lowbit preset at 3 bits, per-token dynamic Linear inputs",
                                _ptq(QuantConfig("lowbit", 3, 3, act_dynamic=True,
                                                 pass_options=quiet))),
        "dynamic-asym-w8a8": ("robust preset, per-token dynamic asymmetric Linear inputs",
                              _ptq(QuantConfig(wbits=8, abits=8, act_dynamic=True,
                                               overrides=ASYM))),
        "lowbit-dynamic-asym-w4a4": ("lowbit, per-token dynamic asymmetric Linear inputs",
                                     _ptq(QuantConfig("lowbit", 4, 4, act_dynamic=True,
                                                      overrides=ASYM, pass_options=quiet))),
        "lowbit-dynamic-asym-w3a3": ("lowbit at 3 bits, per-token dynamic asymmetric Linear inputs",
                                     _ptq(QuantConfig("lowbit", 3, 3, act_dynamic=True,
                                                      overrides=ASYM, pass_options=quiet))),
        "lowbit-w4a4-fb": ("lowbit W4A4 + fallback --max-drop 0.5 (8-bit layers)",
                           _fallback(4, 0.5, val)),
    }  # fmt: skip


def _images(ds: Any, n: int, start: int = 0) -> tuple[Tensor, Tensor]:
    part = subset(ds, start + n, seed=0)
    xs, ys = zip(*(part[i] for i in range(start, len(part))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def _batches(x: Tensor, size: int) -> list[Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


@torch.no_grad()
def predictions(model: nn.Module, x: Tensor, batch: int = 500) -> Tensor:
    model.eval()
    return torch.cat([model(xb).argmax(-1) for xb in x.split(batch)])


def top1(model: nn.Module, x: Tensor, y: Tensor, batch: int = 500) -> float:
    return 100.0 * float((predictions(model, x, batch) == y).float().mean())


def lowered_row(q: nn.Module, eval_x: Tensor, eval_y: Tensor) -> dict[str, Any]:
    """Top-1 of ``lower(q)`` and its agreement with the fake-quant model ``q``."""
    import warnings

    from vitquant.runtime import lower, lowering_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = lower(copy.deepcopy(q), warn=False)
    rep = lowering_report(low)
    fake, ours = predictions(q, eval_x), predictions(low, eval_x)
    return dict(
        lowered_top1=100.0 * float((ours == eval_y).float().mean()),
        lowered_agreement=100.0 * float((ours == fake).float().mean()),
        lowered_attention=rep["attention"],
        lowered_kept=sorted(rep["kept"]),
    )


def find_float(path: str | None) -> Path:
    if path:
        p = Path(path)
        return p / "last.pt" if p.is_dir() else p
    found = sorted(Path("runs/demo/float").glob("*/last.pt"))
    if not found:
        raise SystemExit("no float model: run 'make demo' first or pass --float RUN_DIR")
    return found[-1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and recipe: the mean, min and max drop over the calibration samples."""
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if row["recipe"] != "float":
            groups.setdefault((row["model"], row["recipe"]), []).append(row["drop"])
    return [
        dict(model=m, recipe=r, samples=len(d), mean_drop=sum(d) / len(d), min_drop=min(d),
             max_drop=max(d))
        for (m, r), d in groups.items()
    ]  # fmt: skip


def run_nncf(
    args: argparse.Namespace,
    samples: list[Tensor],
    eval_x: Tensor,
    eval_y: Tensor,
    rows: list[dict],
) -> list[dict[str, Any]]:
    """Rows of ``ptq_nncf.py`` run in its own process on the saved models and the same images."""
    import subprocess
    import sys

    import numpy as np

    folder = Path(args.save_models)
    data = folder / "images.npz"
    calib = {f"calib_x_{k}": x.numpy() for k, x in enumerate(samples)}
    np.savez(data, eval_x=eval_x.numpy(), eval_y=eval_y.numpy(), **calib)
    script = Path(__file__).with_name("ptq_nncf.py")
    cmd = [sys.executable, str(script), "--models", str(folder), "--arch", args.model]
    cmd += ["--data", str(data), "--kinds", *args.kinds]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.strip().splitlines() if "warn" not in ln.lower()][-3:]
        print(f"nncf: exit code {r.returncode}: {' | '.join(tail)}", flush=True)
        return []
    floats = {row["model"]: row["top1"] for row in rows if row["recipe"] == "float"}
    out = []
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            row["drop"] = row["top1"] - floats[row["model"]]
            tag = f"nncf-int8#{row['sample']}" if len(samples) > 1 else "nncf-int8"
            print(f"{row['model']:7s} {tag:14s} {row['top1']:6.2f} {row['drop']:+6.2f}")
            out.append(row)
    return out


def model_args(doc: str, calib_images: int) -> argparse.ArgumentParser:
    """A parser with the options of the float model, the dataset and the calibration images
    (shared by the scripts that calibrate on the demo's float model)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--float", default=None, help="float run folder or checkpoint")
    ap.add_argument("--model", default="vit_micro_patch7_28")
    ap.add_argument("--data-path", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--calib-images", type=int, default=calib_images)
    return ap


def main() -> None:
    ap = model_args(__doc__, 256)
    ap.add_argument(
        "--calib-samples", type=int, default=1,
        help="calibrate every recipe (and NNCF) on this many disjoint samples of --calib-images "
        "training images; the summary gives each recipe's mean drop and range over them",
    )  # fmt: skip
    ap.add_argument("--inject-images", type=int, default=1024)
    ap.add_argument("--eval-images", type=int, default=10000)
    ap.add_argument(
        "--val-images", type=int, default=1000, help="held-out train images for the fallback"
    )
    ap.add_argument(
        "--eval-on", choices=("test", "heldout"), default="test",
        help="test split, or other training images (after the calibration, injection and "
        "validation ones): a second sample to compare recipes on without choosing on the test "
        "split (the float model saw them in training; calibration did not)",
    )  # fmt: skip
    ap.add_argument("--kinds", nargs="+", default=["none", "ln", "gelu", "tokens", "all"])
    ap.add_argument("--recipes", nargs="+", default=None, help="default: all")
    ap.add_argument("--save-models", default=None, help="folder: float models as safetensors")
    ap.add_argument("--nncf", action="store_true", help="also OpenVINO+NNCF int8 (own process)")
    ap.add_argument(
        "--lowered", action="store_true",
        help="also lower each quantized model to the int8 runtime: its top-1 and agreement",
    )  # fmt: skip
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()
    if args.nncf and not args.save_models:
        ap.error("--nncf needs --save-models DIR (the models it quantizes)")
    torch.manual_seed(0)
    ckpt = find_float(args.float)
    base = vitquant.create_model(args.model, checkpoint_path=str(ckpt)).eval()
    train = build_dataset(args.data_path, "train", train_transform=False)
    test = build_dataset(args.data_path, "test", train_transform=False)
    if args.calib_samples < 1:
        ap.error("--calib-samples must be at least 1")
    calib_x, _ = _images(train, args.calib_images)
    inject_x, _ = _images(train, args.inject_images, start=args.calib_images)
    val_x, val_y = _images(train, args.val_images, start=args.calib_images + args.inject_images)
    used = args.calib_images + args.inject_images + args.val_images
    samples = [calib_x]  # sample 0 as before; the others follow the validation images
    for k in range(1, args.calib_samples):
        start = used + (k - 1) * args.calib_images
        samples.append(_images(train, args.calib_images, start=start)[0])
    used += (args.calib_samples - 1) * args.calib_images
    if args.eval_on == "test":
        eval_x, eval_y = _images(test, args.eval_images)
    else:
        eval_x, eval_y = _images(train, args.eval_images, start=used)
    table = recipes(list(zip(_batches(val_x, 250), _batches(val_y, 250), strict=True)))
    names = args.recipes or list(table)
    rows: list[dict[str, Any]] = []
    for kind in args.kinds:
        model = copy.deepcopy(base)
        t0 = time.monotonic()
        if kind != "none":
            kinds = ("ln", "gelu", "tokens") if kind == "all" else (kind,)
            inject_outliers(model, _batches(inject_x, 64), kinds=kinds)
        inject_s = time.monotonic() - t0
        if args.save_models:
            from safetensors.torch import save_file

            Path(args.save_models).mkdir(parents=True, exist_ok=True)
            save_file(model.state_dict(), str(Path(args.save_models) / f"{kind}.safetensors"))
        f1 = top1(model, eval_x, eval_y)
        rows.append(dict(model=kind, recipe="float", top1=f1, drop=0.0, seconds=inject_s))
        print(f"{kind:7s} {'float':14s} {f1:6.2f}", flush=True)
        for name, (k, sample_x) in itertools.product(names, enumerate(samples)):
            t0 = time.monotonic()
            q = table[name][1](model, _batches(sample_x, 32))
            sec = time.monotonic() - t0
            acc = top1(q, eval_x, eval_y)
            row = dict(model=kind, recipe=name, sample=k, top1=acc, drop=acc - f1, seconds=sec)
            extra = ""
            if name.endswith("-fb"):
                row["fallback_layers"] = list(LAST_FALLBACK)
                row["lowered_after_reconstruction"] = list(LOWERED)
                extra = f"  8-bit: {', '.join(LAST_FALLBACK) or '-'}"
                extra += f" (back at low bits: {', '.join(LOWERED)})" if LOWERED else ""
            if args.lowered:
                row |= lowered_row(q, eval_x, eval_y)
                extra += (f"  lowered {row['lowered_top1']:6.2f} ({row['lowered_top1'] - acc:+.2f}"
                          f", agreement {row['lowered_agreement']:.2f}%,"
                          f" {len(row['lowered_kept'])} kept)")  # fmt: skip
            rows.append(row)
            tag = f"{name}#{k}" if len(samples) > 1 else name
            print(f"{kind:7s} {tag:14s} {acc:6.2f} {acc - f1:+6.2f}  {sec:5.1f} s{extra}",
                  flush=True)  # fmt: skip
    if args.nncf:
        rows += run_nncf(args, samples, eval_x, eval_y, rows)
    summary = summarize(rows)
    if len(samples) > 1:
        print(f"\nmean drop over {len(samples)} calibration samples (min..max):")
        for s in summary:
            print(f"{s['model']:7s} {s['recipe']:14s} {s['mean_drop']:+6.2f}"
                  f"  ({s['min_drop']:+.2f}..{s['max_drop']:+.2f})")  # fmt: skip
    report = dict(
        cpu=cpu_name(),
        torch=torch.__version__,
        float_checkpoint=str(ckpt),
        calib_images=args.calib_images,
        calib_samples=len(samples),
        eval_images=len(eval_y),
        eval_on=args.eval_on,
        recipes={n: table[n][0] for n in names},
        rows=rows,
        summary=summary,
    )
    if args.out:
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()

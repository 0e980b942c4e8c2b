"""OpenVINO + NNCF int8 (transformer preset) on the models of ``ptq_outliers.py``, for comparison.

Runs in a process of its own (OpenVINO's thread pool distorts torch timings run beside it):
``ptq_outliers.py --save-models DIR --nncf`` starts it. Each model is converted with
``openvino.convert_model``, quantized with ``nncf.quantize(..., model_type=TRANSFORMER)`` on the
same calibration images as vitquant's recipes (NNCF's defaults otherwise: SmoothQuant, per-channel
weights, bias correction, its ignored operations), compiled for the CPU and evaluated on the same
test images. The npz holds one calibration sample ``calib_x`` or several (``calib_x_0``,
``calib_x_1``, ...: ``ptq_outliers.py --calib-samples``); each is quantized on its own. Prints
one JSON line per model and sample: ``{"model", "recipe", "sample", "top1", "seconds"}``.

Needs the optional ``bench`` extra (``pip install -e .[bench]``: openvino, nncf).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", required=True, help="folder of <kind>.safetensors")
    ap.add_argument("--arch", default="vit_micro_patch7_28")
    ap.add_argument("--data", required=True, help="npz with calib_x, eval_x, eval_y")
    ap.add_argument("--kinds", nargs="+", required=True)
    args = ap.parse_args()
    try:
        import nncf
        import openvino as ov
    except ImportError as e:  # pragma: no cover - optional
        sys.exit(f"error: {e}; install the bench extra: pip install -e '.[bench]'")
    from safetensors.torch import load_file

    import vitquant

    data = np.load(args.data)
    eval_x, eval_y = data["eval_x"], data["eval_y"]
    keys = sorted((k for k in data.files if k.startswith("calib_x_")), key=lambda k: int(k[8:]))
    samples = [(int(k[8:]), data[k]) for k in keys] or [(0, data["calib_x"])]
    core = ov.Core()
    for kind in args.kinds:
        sd = load_file(str(Path(args.models) / f"{kind}.safetensors"))
        model = vitquant.create_model(args.arch, num_classes=sd["head.weight"].shape[0]).eval()
        model.load_state_dict(sd)
        for sample, calib_x in samples:
            row = _quantize_and_eval(nncf, core, ov, model, calib_x, eval_x, eval_y)
            print(json.dumps({"model": kind, "recipe": "nncf-int8", "sample": sample, **row}))
            sys.stdout.flush()


def _quantize_and_eval(
    nncf: Any, core: Any, ov: Any, model: torch.nn.Module, calib_x: Any, eval_x: Any, eval_y: Any
) -> dict[str, float]:
    """NNCF int8 of ``model`` calibrated on ``calib_x``: its top-1 on the eval images, seconds."""
    t0 = time.monotonic()
    ov_model = ov.convert_model(model, example_input=torch.from_numpy(calib_x[:1]))
    ds = nncf.Dataset([calib_x[i : i + 1] for i in range(len(calib_x))])
    q = nncf.quantize(ov_model, ds, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib_x))
    sec = time.monotonic() - t0
    compiled = core.compile_model(q, "CPU")
    out = compiled.outputs[0]
    hits = 0
    for i in range(0, len(eval_x), 500):
        logits = compiled(eval_x[i : i + 500])[out]
        hits += int((logits.argmax(-1) == eval_y[i : i + 500]).sum())
    return {"top1": 100.0 * hits / len(eval_y), "seconds": sec}


if __name__ == "__main__":
    main()

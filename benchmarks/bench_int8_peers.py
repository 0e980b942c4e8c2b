"""Non-torch int8 peers for ``bench_int8.py``, one peer per process, beside timm's fp32 model.

* ``--peer openvino``: OpenVINO int8 after NNCF post-training quantization
  (``nncf.quantize(..., model_type=TRANSFORMER)``, NNCF's defaults: SmoothQuant, per-channel
  weights), and OpenVINO's default compilation of the fp32 model (it runs bfloat16 where the
  CPU's hints say so), both with ``INFERENCE_NUM_THREADS`` = ``--threads``;
* ``--peer onnxruntime``: onnxruntime int8 QDQ (``quantize_static``) of the ONNX export, when
  onnxruntime and onnx are installed (skipped otherwise).

Each runs alternated with timm's fp32 model (fused SDPA attention, torch, same thread count)
in the same process, so that every figure is also a ratio to timm fp32 measured beside it.
Prints one JSON line per (model, batch). Needs the optional ``bench`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_int8_common import machine, summarize, time_alternating, timm_fp32  # noqa: E402


def _openvino(name: str, batch: int, threads: int) -> dict[str, Callable[[], Any]]:
    import nncf
    import openvino as ov

    model = timm_fp32(name)
    x = torch.randn(batch, 3, 224, 224)
    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    ov_model = ov.convert_model(model, example_input=x)
    gen = np.random.default_rng(0)
    calib = [gen.standard_normal((1, 3, 224, 224), dtype=np.float32) for _ in range(8)]
    q = nncf.quantize(
        ov_model, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER, subset_size=8
    )
    int8 = core.compile_model(q, "CPU", cfg)
    default = core.compile_model(ov_model, "CPU", cfg)
    xn = x.numpy()
    return {"openvino-int8": lambda: int8(xn), "openvino-default": lambda: default(xn)}


def _onnxruntime(name: str, batch: int, threads: int) -> dict[str, Callable[[], Any]]:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    model = timm_fp32(name)
    x = torch.randn(batch, 3, 224, 224)
    tmp = tempfile.mkdtemp()
    fp32_path, q_path = os.path.join(tmp, "m.onnx"), os.path.join(tmp, "m_int8.onnx")
    torch.onnx.export(model, (x,), fp32_path, input_names=["x"], dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            gen = np.random.default_rng(0)
            self.items = iter(
                [{"x": gen.standard_normal(x.shape, dtype=np.float32)} for _ in range(4)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(fp32_path, q_path, Reader(), quant_format=QuantFormat.QDQ)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(q_path, opts, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    return {"onnxruntime-int8": lambda: sess.run(None, {"x": xn})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer", choices=["openvino", "onnxruntime"], required=True)
    p.add_argument(
        "--models", nargs="+", default=["deit_small_patch16_224", "vit_base_patch16_224"]
    )
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    build = _openvino if args.peer == "openvino" else _onnxruntime
    for name in args.models:
        for batch in args.batch:
            rec: dict[str, Any] = {"peer": args.peer, "model": name, "batch": batch}
            try:
                fns = build(name, batch, args.threads)
            except ImportError as e:
                rec["skipped"] = f"not installed ({e}); pip install -e '.[bench]'"
                print(json.dumps(rec), flush=True)
                return 0
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                rec["skipped"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(rec), flush=True)
                continue
            ref = timm_fp32(name)
            x = torch.randn(batch, 3, 224, 224)

            def timm_run(m: torch.nn.Module = ref, x: torch.Tensor = x) -> Any:
                with torch.inference_mode():
                    return m(x)

            times = time_alternating({"timm-fp32": timm_run, **fns}, args.repeats, args.warmup)
            rec["variants"] = summarize(times, "timm-fp32")
            rec["machine"] = machine()
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

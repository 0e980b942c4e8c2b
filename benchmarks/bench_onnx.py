"""onnxruntime speed: vitquant's QDQ int8 ONNX export against the fp32 ONNX of the same model.

DeiT-S and ViT-B/16 at 224 (random weights: speed does not depend on them), batch 1 and 8, on
onnxruntime's CPU provider with 2 intra-op threads (``--threads``). For each (model, preset,
batch) the two sessions run in the same process, alternated round by round (fp32, int8, fp32,
...), and the script prints the median times and the median of the per-round ratios
fp32 / int8, plus the file sizes and the agreement of the int8 graph with vitquant's fake-quant
model on the timed batch (cosine, top-1). Everything, with the CPU name and flags from
``lscpu``, goes to a JSON file.

Variants:

* ``ort-fp32``: ``torch.onnx.export`` of the float model (opset 17), onnxruntime with all graph
  optimizations;
* ``ort-int8``: ``prepare(preset W8A8) -> calibrate(max, 2 random images) ->
  vitquant.export.onnx.to_onnx``: QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses
  into its integer kernels (QLinearMatMul, MatMulIntegerToFloat, ...).

``--agreement CKPT`` measures agreement instead of speed, on real data: a trained
``vit_micro_patch7_28`` (e.g. the demo's float model) is calibrated on 320 Fashion-MNIST training
images for each preset (percentile), exported, and run on the whole test set by onnxruntime with
its integer fusions and without them (float emulation), against the fake-quant model.

``--softmax`` measures onnxruntime's fused ``QLinearSoftmax`` against the exact graph: a
standalone ``Q -> DQ -> Softmax -> Q -> DQ`` graph (17 tokens, 4,000 random rows) run with and
without graph optimizations, for several output scales; it prints the fraction of probability
codes that differ.

Usage::

    PYTHONPATH=src python benchmarks/bench_onnx.py                        # both models, ft1
    PYTHONPATH=src python benchmarks/bench_onnx.py --models deit_small_patch16_224 --preset ft1 ft2
    PYTHONPATH=src python benchmarks/bench_onnx.py --softmax
    PYTHONPATH=src python benchmarks/bench_onnx.py --agreement runs/demo/float/<run>/best.pt \
        --preset ft1 ft2 robust --json benchmarks/results/onnx_agreement.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import vitquant  # noqa: E402
from vitquant.export.onnx import to_onnx  # noqa: E402
from vitquant.export.onnx_run import compare_onnx, onnx_session  # noqa: E402
from vitquant.quant import QuantConfig, calibrate, prepare  # noqa: E402
from vitquant.runtime.speed import time_alternating  # noqa: E402


def cpu_info() -> dict[str, Any]:
    """CPU model name, core count and flags (``lscpu``), plus the int8-relevant flags."""
    info: dict[str, Any] = {"model_name": "", "flags": []}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "Model name":
            info["model_name"] = value
        elif key == "Flags":
            info["flags"] = value.split()
        elif key in ("CPU(s)", "Thread(s) per core", "Core(s) per socket"):
            info[key] = value
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
    info["int8_flags"] = [f for f in wanted if f in info["flags"]]
    return info


def _export_fp32(model: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), path, dynamo=False, opset_version=17, input_names=["input"],
            output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip


def bench_model(name: str, preset: str, args: argparse.Namespace, tmp: str) -> list[dict]:
    """Times fp32 and int8 onnxruntime sessions of one model at every batch size."""
    torch.manual_seed(0)
    fp32 = vitquant.create_model(name).eval()
    size = fp32.patch_embed.img_size
    x1 = torch.randn(1, 3, *size)
    q = prepare(copy.deepcopy(fp32), QuantConfig(preset=preset, wbits=8, abits=8))
    calibrate(q, [torch.randn(2, 3, *size)], method="max", progress=False)
    paths = {"ort-fp32": os.path.join(tmp, f"{name}.fp32.onnx")}
    paths["ort-int8"] = os.path.join(tmp, f"{name}.{preset}.int8.onnx")
    _export_fp32(fp32, x1, paths["ort-fp32"])
    rep = to_onnx(q, paths["ort-int8"], x1)
    sessions = {k: onnx_session(p, args.threads) for k, p in paths.items()}
    results = []
    for batch in args.batch:
        x = torch.randn(batch, 3, *size)
        feed = {"input": x.numpy()}

        def call(k: str, feed: dict[str, Any] = feed) -> Any:
            return lambda: sessions[k].run(None, feed)

        times = time_alternating({k: call(k) for k in sessions}, args.repeats, args.warmup)
        ratios = [f / i for f, i in zip(times["ort-fp32"], times["ort-int8"])]
        agree = compare_onnx(q, paths["ort-int8"], x)
        results.append(
            {
                "model": name,
                "preset": preset,
                "batch": batch,
                "threads": args.threads,
                "qdq_pairs": rep.counts["qdq_pairs"],
                "int8_weights": rep.counts["weight_dequantize"],
                "file_mb": {k: os.path.getsize(p) / 2**20 for k, p in paths.items()},
                "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
                "speedup_int8_vs_fp32": statistics.median(ratios),
                "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
                "int8_vs_fakequant": agree,
            }
        )
        r = results[-1]
        print(
            f"{name:24s} {preset:5s} batch {batch:2d}: fp32 {r['median_ms']['ort-fp32']:8.1f} ms"
            f"  int8 {r['median_ms']['ort-int8']:8.1f} ms  int8 speed-up "
            f"{r['speedup_int8_vs_fp32']:.2f}x  (cosine vs fake-quant {agree['cosine']:.5f}, "
            f"top-1 {agree['top1_agreement']:.3f})"
        )
        sys.stdout.flush()
    return results


def softmax_flips(args: argparse.Namespace, tmp: str) -> list[dict]:
    """Fraction of softmax output codes where onnxruntime's QLinearSoftmax differs from the
    unfused graph, per output scale (int8 scores with scale 0.05, uint8 probabilities)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows = []
    x = (np.random.RandomState(0).randn(4000, 17) * 2).astype(np.float32)
    for sy in (1 / 127, 1 / 128, 1 / 255, 1 / 256, 0.3 / 127, 0.9 / 127, 0.3 / 255):
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
            helper.make_node("Softmax", ["xd"], ["p"], axis=-1),
            helper.make_node("QuantizeLinear", ["p", "sy", "zy"], ["pq"]),
            helper.make_node("DequantizeLinear", ["pq", "sy", "zy"], ["y"]),
        ]
        inits = [
            numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
            numpy_helper.from_array(np.array(0, np.int8), "zx"),
            numpy_helper.from_array(np.array(sy, np.float32), "sy"),
            numpy_helper.from_array(np.array(0, np.uint8), "zy"),
        ]
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 17]) for n in "xy"]
        graph = helper.make_graph(nodes, "softmax", [io[0]], [io[1]], inits)
        path = os.path.join(tmp, "softmax.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        exact, fused = (onnx_session(path, 1, optimize=o).run(None, {"x": x})[0] for o in (0, 1))
        diff = np.round((fused - exact) / sy)
        rows.append({"scale": sy, "differ": float((diff != 0).mean()), "mean": float(diff.mean())})
        print(f"output scale 1/{1 / sy:6.1f}: {rows[-1]['differ'] * 100:5.2f} % of codes differ "
              f"(mean {rows[-1]['mean']:+.4f} steps)")  # fmt: skip
    return rows


def agreement(ckpt: str, args: argparse.Namespace, tmp: str) -> list[dict]:
    """Top-1 and agreement of onnxruntime with the fake-quant model on a real test set."""
    from vitquant.data import build_dataset, subset
    from vitquant.export.onnx_run import run_onnx

    model = vitquant.create_model(args.agreement_model, checkpoint_path=ckpt).eval()
    train = subset(build_dataset(args.data_path, "train", train_transform=False), 320, seed=0)
    calib = list(torch.stack([train[i][0] for i in range(len(train))]).split(32))
    test = build_dataset(args.data_path, "test", train_transform=False)
    xs = torch.stack([test[i][0] for i in range(len(test))])
    ys = torch.tensor([int(test[i][1]) for i in range(len(test))])

    def top1(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == ys).float().mean()) * 100

    with torch.no_grad():
        rows = [{"variant": "float", "top1": top1(torch.cat([model(b) for b in xs.split(500)]))}]
    for preset in args.preset:
        cfg = QuantConfig(preset=preset, wbits=8, abits=8, disable=list(args.disable))
        q = prepare(copy.deepcopy(model), cfg)
        calibrate(q, calib, method="percentile", progress=False)
        path = os.path.join(tmp, f"agree.{preset}.onnx")
        rep = to_onnx(q, path, xs[:1])
        with torch.no_grad():
            fq = torch.cat([q(b) for b in xs.split(500)])
        row: dict[str, Any] = {"variant": preset, "disable": list(args.disable)}
        row["fakequant_top1"] = top1(fq)
        row["qdq_pairs"], row["int8_weights"] = rep.activation_points, rep.weight_points
        for key, opt in (("ort_int8", True), ("ort_unfused", False)):
            sess = onnx_session(path, args.threads, optimize=opt)
            out = torch.cat([run_onnx(sess, b) for b in xs.split(500)])
            cos = torch.nn.functional.cosine_similarity(out.flatten(), fq.flatten(), dim=0)
            agree = float((out.argmax(1) == fq.argmax(1)).float().mean()) * 100
            row[key] = {"top1": top1(out), "top1_agreement": agree, "cosine": float(cos)}
        rows.append(row)
        print(
            f"{preset:7s} fake-quant top-1 {row['fakequant_top1']:.2f}  onnxruntime int8 "
            f"{row['ort_int8']['top1']:.2f} (agreement {row['ort_int8']['top1_agreement']:.2f} "
            f"%, cosine {row['ort_int8']['cosine']:.6f})  unfused agreement "
            f"{row['ort_unfused']['top1_agreement']:.2f} %"
        )
        sys.stdout.flush()
    print(f"float top-1 {rows[0]['top1']:.2f} on {len(ys)} test images")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["deit_small_patch16_224", "vit_base_patch16_224"]
    )
    p.add_argument("--preset", nargs="+", default=["ft1"], help="vitquant presets (W8A8)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default="benchmarks/results/bench_onnx.json")
    p.add_argument("--agreement", metavar="CKPT", help="measure agreement of a trained model")
    p.add_argument("--agreement-model", default="vit_micro_patch7_28")
    p.add_argument("--data-path", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--softmax", action="store_true", help="measure QLinearSoftmax's flips")
    p.add_argument("--disable", nargs="*", default=[], help="point kinds to leave float")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.softmax:
            results = softmax_flips(args, tmp)
        elif args.agreement:
            results = agreement(args.agreement, args, tmp)
        else:
            for name in args.models:
                for preset in args.preset:
                    results.extend(bench_model(name, preset, args, tmp))
    meta = {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": cpu_info(),
        "args": vars(args),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp_json = args.json + ".tmp"
    with open(tmp_json, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    os.replace(tmp_json, args.json)
    print(f"wrote {args.json} ({meta['cpu']['model_name']}, {' '.join(meta['cpu']['int8_flags'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

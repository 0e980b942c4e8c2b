"""Why a per-token W4A4 model's lowered predictions agree less with its fake-quant model.

Calibrates one recipe (default ``lowbit`` W4A4 with per-token dynamic Linear inputs, and the
static recipe beside it) on a float model, then measures on test images:

* agreement of the fake-quant model run in float64 with its float32 run (how much float
  rounding alone moves its predictions);
* agreement of the lowered model with the fake-quant one, on the exact float64 ``reference``
  backend, on the default (oneDNN) backend and on ``intmm`` (``torch._int_mm``, torch's
  epilogues);
* per per-token quantizer, the share of its inputs (one batch, float32 run) whose ``x / s`` lies
  within 1e-5 and within 1e-3 of a rounding midpoint: equal shares mean exact ties, not a
  continuum of near-ties.

Example:
    PYTHONPATH=src python benchmarks/ptq_dynamic_ties.py \\
        --float runs/tiny/vit_tiny_patch7_28/fashion-mnist/float6 --model vit_tiny_patch7_28 \\
        --out benchmarks/results/ptq_dynamic_ties_vit_tiny.json
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from ptq_outliers import (  # the same folder
    _images,
    cpu_name,
    find_float,
    model_args,
    predictions,
)
from torch import Tensor, nn

import vitquant
from vitquant._atomic import atomic_write_json
from vitquant.data import build_dataset
from vitquant.quant import QuantConfig, calibrate, prepare
from vitquant.quant.quantizers.dynamic import DynamicQuantizer
from vitquant.runtime import lower


def _agree(a: Tensor, b: Tensor) -> float:
    return 100.0 * float((a == b).float().mean())


@torch.no_grad()
def tie_shares(q: nn.Module, x: Tensor) -> dict[str, list[float]]:
    """Per dynamic quantizer: shares of ``x / s`` within 1e-5 and 1e-3 of a midpoint."""
    inputs: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i[0].detach()))
        for n, m in q.named_modules()
        if isinstance(m, DynamicQuantizer)
    ]
    q(x)
    for h in hooks:
        h.remove()
    out = {}
    for name, v in inputs.items():
        m = q.get_submodule(name)
        qp = m.qparams()
        bits, clip = qp.bits, float(qp.scale.reshape(()))
        qdiv = 2 ** (bits - 1) - 1 if getattr(m, "symmetric", True) else 2**bits - 1
        v64 = v.double().reshape(-1, v.shape[-1])
        s = (clip * v64.abs().amax(-1, keepdim=True) / qdiv).clamp_min(1e-12)
        r = v64 / s
        dist = (r - r.floor() - 0.5).abs()
        out[name] = [float((dist < 1e-5).double().mean()), float((dist < 1e-3).double().mean())]
    return out


def main() -> None:
    ap = model_args(__doc__, 128)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base = vitquant.create_model(args.model, checkpoint_path=str(find_float(args.float))).eval()
    train = build_dataset(args.data_path, "train", train_transform=False)
    test = build_dataset(args.data_path, "test", train_transform=False)
    cx, _ = _images(train, args.calib_images)
    ex, _ = _images(test, args.eval_images)
    quiet = {"reconstruct": {"progress": False}}
    report: dict[str, Any] = {"cpu": cpu_name(), "torch": torch.__version__, "rows": {}}
    for name, dyn in (("dynamic", True), ("static", False)):
        cfg = QuantConfig("lowbit", args.bits, args.bits, act_dynamic=dyn, pass_options=quiet)
        q = calibrate(prepare(copy.deepcopy(base), cfg), list(cx.split(32)), progress=False)
        ref = predictions(q, ex)
        row: dict[str, Any] = {
            "fake_quant_float64_agreement": _agree(
                predictions(copy.deepcopy(q).double(), ex.double()), ref
            ),
            "lowered_reference_agreement": _agree(
                predictions(lower(copy.deepcopy(q), "reference", warn=False), ex), ref
            ),
            "lowered_agreement": _agree(predictions(lower(copy.deepcopy(q), warn=False), ex), ref),
            "lowered_intmm_agreement": _agree(
                predictions(lower(copy.deepcopy(q), "intmm", warn=False), ex), ref
            ),
        }
        if dyn:
            row["tie_shares"] = tie_shares(q, ex[:200])
        report["rows"][name] = row
        ties = max((v[0] for v in row.get("tie_shares", {}).values()), default=0.0)
        print(
            f"{name:8s} fake-quant fp64 vs fp32 {row['fake_quant_float64_agreement']:6.2f} %  "
            f"lowered reference {row['lowered_reference_agreement']:6.2f} %  "
            f"lowered {row['lowered_agreement']:6.2f} %  "
            f"intmm {row['lowered_intmm_agreement']:6.2f} %"
            + (f"  largest exact-tie share {100 * ties:.2f} %" if dyn else ""),
            flush=True,
        )
    if args.out:
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()

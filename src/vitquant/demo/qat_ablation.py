"""The QAT ablation of ``docs/qat.md``: LSQ, Q-ViT (± IRM, ± DGD; IRM with fixed per-channel
statistics by default, per token as the released code, or dynamic as the paper), VVTQ
(± regulariser, ± freezing) and FasterTransformer QAT on the demo model, each against float.

Every row is one :func:`~vitquant.train.qat_run.run_qat` run (so one ``vitquant train`` command,
printed
with the row). Run it as ``python -m vitquant.demo.qat_ablation --finetune <float run> --bits 4 2``;
rows can run in parallel processes (``--jobs``).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from typing import Any

__all__ = [
    "ROWS",
    "OSC_KEYS",
    "TRAIN_OPTIONS",
    "heldout_top1",
    "row_command",
    "run_row",
    "float_and_ptq",
    "main",
]

#: per-epoch oscillation numbers the ``vvtq`` method logs (see ``oscillation_stats``)
OSC_KEYS = ("osc_pct", "frozen_pct", "flip_pct", "flip2_pct", "change_pct")

#: row name -> (method, method options); the table's bits are added unless a row pins its own
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "lsq": ("lsq", {}),
    "qvit": ("qvit", {}),
    "qvit-no-irm": ("qvit", {"irm": False}),
    "qvit-no-dgd": ("qvit", {"dgd": False}),
    "qvit-no-irm-no-dgd": ("qvit", {"irm": False, "dgd": False}),
    # IRM as the released code: LayerNorm statistics per token
    "qvit-irm-token": ("qvit", {"irm_stats": "token"}),
    "qvit-irm-token-no-dgd": ("qvit", {"irm_stats": "token", "dgd": False}),
    # IRM as the paper defines it: re-normalised by the current q/k's statistics (the rows
    # above without irm_stats use the default fixed-statistics form, "channel")
    "qvit-irm-dynamic": ("qvit", {"irm_stats": "dynamic"}),
    "qvit-irm-dynamic-no-dgd": ("qvit", {"irm_stats": "dynamic", "dgd": False}),
    # DGD's weight (the paper sums over layers and heads; vitquant averages, weight 1)
    "qvit-dgd0.3": ("qvit", {"dgd_weight": 0.3}),
    "qvit-dgd3": ("qvit", {"dgd_weight": 3.0}),
    "qvit-dgd10": ("qvit", {"dgd_weight": 10.0}),
    "vvtq": ("vvtq", {"reg": True}),
    "vvtq-no-reg": ("vvtq", {"reg": False}),
    "vvtq-no-freeze": ("vvtq", {"reg": True, "freeze": False}),
    "vvtq-no-reg-no-freeze": ("vvtq", {"reg": False, "freeze": False}),
    "vvtq-reg1-no-freeze": ("vvtq", {"reg": True, "reg_max": 1.0, "freeze": False}),
    "vvtq-reg10-no-freeze": ("vvtq", {"reg": True, "reg_max": 10.0, "freeze": False}),
    "vvtq-reg100-no-freeze": ("vvtq", {"reg": True, "reg_max": 100.0, "freeze": False}),
    "vvtq-reg100": ("vvtq", {"reg": True, "reg_max": 100.0}),
    # freezing at a threshold the measured frequencies reach (see docs/qat.md)
    "vvtq-no-reg-th02": ("vvtq", {"reg": False, "osc_threshold": 0.02}),
    # FasterTransformer QAT in the seed's mode (W8A8, whatever the table's bits), and at the
    # table's bits, where ft2 PTQ loses accuracy for QAT to win back
    "ft-qat": ("ft-qat", {"wbits": 8, "abits": 8}),
    "ft-qat-bits": ("ft-qat", {}),
    # the seeds' full recipes add DeiT distillation from the float teacher (Q-ViT: hard)
    "lsq-hard-kd": ("lsq", {"distillation_type": "hard"}),
    "qvit-hard-kd": ("qvit", {"distillation_type": "hard"}),
}

#: row options that are training options (the rest are the method's); a distillation row's
#: teacher is the ``--finetune`` float model
TRAIN_OPTIONS = ("distillation_type", "distillation_alpha", "distillation_tau")


def _flag(k: str, v: Any) -> str:
    name = "--" + k.replace("_", "-")
    if isinstance(v, bool):
        return name if v else "--no-" + k.replace("_", "-")
    return f"{name} {v}"


def row_command(method: str, opts: dict[str, Any], finetune: str, train: dict[str, Any]) -> str:
    """The ``vitquant train`` command equivalent to a row."""
    from vitquant.train.qat_run import FT_QAT_DEFAULTS, QAT_DEFAULTS

    base = FT_QAT_DEFAULTS if method == "ft-qat" else QAT_DEFAULTS
    train = dict(train)
    parts = [
        f"vitquant train --model {train.pop('model', 'vit_micro_patch7_28')}",
        f"--method {method}",
        f"--finetune {finetune}",
    ]
    parts += [_flag(k, v) for k, v in {**base, **train}.items()]
    parts += [_flag(k, v) for k, v in opts.items()]
    return " ".join(parts)


def run_row(name: str, bits: int, finetune: str, **train: Any) -> dict[str, Any]:
    """Runs one row at ``bits`` (weights and activations, unless the row pins its own) and
    returns its record."""
    from vitquant.train.experiment import Experiment
    from vitquant.train.qat_run import run_qat

    method, row_opts = ROWS[name]
    opts: dict[str, Any] = {"wbits": bits, "abits": bits}
    for k, v in row_opts.items():
        if k in TRAIN_OPTIONS:
            train = {**train, k: v, "teacher": finetune}
        else:
            opts[k] = v
    b = opts["wbits"]
    seed = int(train.get("seed", 0))
    folder = f"{name}-w{b}a{b}" + (f"-s{seed}" if seed else "")
    res = run_qat(method, finetune, method_args=opts, name=folder, **train)
    epochs = Experiment(res["experiment"]).read_log()
    cmd_train = {k: v for k, v in train.items() if k not in ("output", "quiet", "amp", "device")}
    rec: dict[str, Any] = {
        "row": name,
        "bits": b,
        "seed": seed,
        "top1": res["top1"],
        "top1_per_epoch": [r.get("top1") for r in epochs],
    }
    for key in OSC_KEYS:
        rec[f"{key}_per_epoch"] = [round(r[key], 3) for r in epochs if key in r]
    rec["command"] = row_command(method, opts, finetune, cmd_train)
    rec["experiment"] = res["experiment"]
    rec["train_time_s"] = res["train_time_s"]
    return rec


def heldout_top1(experiment: str, n: int = 5000, seed: int = 1234) -> float:
    """Top-1 of a finished run on ``n`` training-split images it did *not* train on.

    The validation set for choosing hyperparameters without looking at the test set: the images
    are drawn (seeded) from the complement of the run's ``train_subset``. Evaluated with the
    run's last checkpoint, on the CPU.
    """
    import torch

    from vitquant import data as D
    from vitquant.errors import ConfigError
    from vitquant.train.data import eval_loader, model_img_size
    from vitquant.train.engine import evaluate
    from vitquant.train.evaluation import EvalSpec, load_model_for_eval
    from vitquant.train.experiment import Experiment

    cfg = Experiment(experiment).stored_config()
    if cfg is None or not cfg.train_subset:
        raise ConfigError(f"{experiment}: needs a finished run trained on a --train-subset")
    info = D.dataset_info(cfg.data_path)
    dev = torch.device("cpu")
    spec = EvalSpec(run_dir=experiment, which="last")
    model, _ = load_model_for_eval(spec, int(info.num_classes), int(info.in_chans), dev)
    full = D.build_dataset(
        cfg.data_path, cfg.train_split, img_size=model_img_size(model), train_transform=False
    )
    used = set(D.subset(full, cfg.train_subset, seed=cfg.seed).indices)
    rest = torch.tensor([i for i in range(len(full)) if i not in used])
    gen = torch.Generator().manual_seed(seed)
    pick = rest[torch.randperm(len(rest), generator=gen)[:n]].sort().values.tolist()
    return float(evaluate(model, eval_loader(D.Subset(full, pick), 256), dev)["top1"])


def float_and_ptq(
    finetune: str,
    model: str,
    data_path: str,
    device: str,
    eval_subset: int = 0,
    bits: tuple[int, ...] = (8,),
) -> dict[str, float]:
    """Top-1 of the float checkpoint (``"float"``) and of its ft2 PTQ at each of ``bits``
    (``"ptq_ft2_w8a8"`` ...; percentile 99.99, 10 batches of 32 training images): the start
    points of the ``ft-qat`` rows."""
    import torch

    from vitquant import data as D
    from vitquant.models import create_model
    from vitquant.quant import QuantConfig, calibrate, prepare
    from vitquant.train.build import load_finetune
    from vitquant.train.data import eval_loader, model_img_size
    from vitquant.train.engine import evaluate

    info = D.dataset_info(data_path)
    net = create_model(model, num_classes=info.num_classes, in_chans=info.in_chans)
    load_finetune(net, finetune, model)
    dev = torch.device(device)
    net.to(dev)
    size = model_img_size(net)
    ev_set = D.build_dataset(data_path, "val", img_size=size, train_transform=False)
    if eval_subset:
        ev_set = D.subset(ev_set, eval_subset, seed=0)
    ev = eval_loader(ev_set, 256)
    out = {"float": evaluate(net, ev, dev)["top1"]}
    cal = D.build_dataset(data_path, "train", img_size=size, train_transform=False)
    calib = torch.utils.data.DataLoader(cal, batch_size=32, shuffle=False)
    for b in dict.fromkeys(bits):
        qnet = copy.deepcopy(net)
        prepare(qnet, QuantConfig(preset="ft2", wbits=b, abits=b, calibrator="percentile"))
        calibrate(qnet, calib, num_batches=10, progress=False)
        out[f"ptq_ft2_w{b}a{b}"] = evaluate(qnet, ev, dev)["top1"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--finetune", required=True)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--eval-subset", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: run_qat's)")
    p.add_argument(
        "--augment",
        default="none",
        choices=["none", "default", "rrc"],
        help="training augmentation (the demo float model was trained without)",
    )
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the training subset, order and init"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--data-path", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--output", default="runs/qat-ablation")
    p.add_argument("--jobs", type=int, default=1, help="rows run in parallel processes")
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--no-float", action="store_true", help="skip the float and PTQ rows")
    p.add_argument(
        "--heldout",
        type=int,
        default=0,
        help="also evaluate each row on N training images outside its subset (validation)",
    )
    p.add_argument("--one", nargs=2, metavar=("ROW", "BITS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    train: dict[str, Any] = dict(
        epochs=a.epochs,
        train_subset=a.train_subset,
        eval_subset=a.eval_subset,
        batch_size=a.batch_size,
        augment=a.augment,
        eval_every=a.eval_every,
        seed=a.seed,
        device=a.device,
        amp=False,
        output=a.output,
        data_path=a.data_path,
    )
    if a.lr is not None:
        train["lr"] = a.lr
    if a.one:
        rec = run_row(a.one[0], int(a.one[1]), a.finetune, **train)
        if a.heldout:
            rec["heldout_top1"] = heldout_top1(rec["experiment"], a.heldout)
        print(json.dumps(rec), flush=True)
        return 0
    pinned = [r for r in a.rows if "wbits" in ROWS[r][1]]  # one run, at the row's own bits
    jobs = [(r, b) for b in a.bits for r in a.rows if r not in pinned or b == a.bits[0]]
    records: list[dict[str, Any]] = []
    procs: list[subprocess.Popen] = []
    base = [sys.executable, "-m", "vitquant.demo.qat_ablation", "--finetune", a.finetune]
    for opt in (
        "epochs",
        "train_subset",
        "eval_subset",
        "batch_size",
        "augment",
        "eval_every",
        "seed",
        "device",
        "output",
        "data_path",
    ):
        base += ["--" + opt.replace("_", "-"), str(getattr(a, opt))]
    if a.lr is not None:
        base += ["--lr", str(a.lr)]
    if a.heldout:
        base += ["--heldout", str(a.heldout)]
    pending = list(jobs)
    while pending or procs:
        while pending and len(procs) < max(1, a.jobs):
            r, b = pending.pop(0)
            procs.append(
                subprocess.Popen(base + ["--one", r, str(b)], stdout=subprocess.PIPE, text=True)
            )
        done = procs.pop(0)
        out, _ = done.communicate()
        for line in out.splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
                print(line, flush=True)
    extra: dict[str, float] = {}
    if not a.no_float:
        extra = float_and_ptq(
            a.finetune,
            "vit_micro_patch7_28",
            a.data_path,
            "cuda" if a.device in ("auto", "cuda") and _cuda() else "cpu",
            a.eval_subset,
            bits=(8, *a.bits),
        )
        print(json.dumps(extra), flush=True)
    if a.json:
        from vitquant.train.checkpoint import write_json

        write_json(a.json, {"rows": records, **extra})
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())

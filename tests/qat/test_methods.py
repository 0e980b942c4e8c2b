"""The QAT training methods through the training engine (small runs on the digits data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitquant.errors import CheckpointError, ConfigError, DataError
from vitquant.train.config import TrainConfig
from vitquant.train.qat_run import make_softlabels, run_qat
from vitquant.train.trainer import fit

SRC = str(Path(__file__).resolve().parents[2] / "src")
TINY = dict(
    data_path="digits",
    train_subset=128,
    eval_subset=64,
    batch_size=32,
    epochs=1,
    quiet=True,
)


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("float")
    cfg = TrainConfig(
        model="vit_nano_patch4_28",
        data_path="digits",
        train_subset=256,
        eval_subset=64,
        batch_size=32,
        epochs=1,
        lr=2e-3,
        warmup_epochs=0,
        output=str(out),
        name="float",
    )
    res = fit(cfg, quiet=True)
    return res["experiment"]


def _log(exp: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(exp, "log.jsonl"))]


def test_lsq_runs_and_learns_steps(
    float_ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitquant.methods.qat.method import QATMethod
    from vitquant.quant import named_quantizers

    initial: dict[str, torch.Tensor] = {}
    prepare = QATMethod.prepare_model

    def recording_prepare(self: QATMethod, model: torch.nn.Module, ctx: object) -> object:
        out = prepare(self, model, ctx)  # type: ignore[arg-type]
        for name, q in named_quantizers(out):
            initial[f"{name}.scale"] = q.scale.detach().clone()
        return out

    monkeypatch.setattr(QATMethod, "prepare_model", recording_prepare)
    res = run_qat(
        "lsq",
        float_ckpt,
        model="vit_nano_patch4_28",
        output=str(tmp_path),
        method_args={"wbits": 4, "abits": 4},
        **TINY,
    )
    assert 0.0 <= res["top1"] <= 100.0
    state = torch.load(os.path.join(res["experiment"], "last.pt"), weights_only=True)["model"]
    weights = [k for k in initial if k.endswith("weight_quantizer.scale")]
    acts = [k for k in initial if k.endswith("input_quantizer.scale")]
    assert weights and acts and all(k in state for k in initial)
    for k in initial:
        assert state[k].shape == initial[k].shape and initial[k].numel() > 0, k

    def moved(keys: list[str]) -> list[str]:
        return [k for k in keys if not torch.allclose(state[k], initial[k], rtol=1e-4, atol=0)]

    # training moved the learned step sizes away from their initialisation (LSQ's point)
    assert len(moved(weights)) >= 0.9 * len(weights), moved(weights)
    assert len(moved(acts)) >= 0.5 * len(acts), moved(acts)


def test_qvit_logs_dgd_and_uses_irm(float_ckpt: str, tmp_path: Path) -> None:
    res = run_qat(
        "qvit",
        float_ckpt,
        model="vit_nano_patch4_28",
        output=str(tmp_path),
        method_args={"wbits": 3, "abits": 3},
        **TINY,
    )
    rec = _log(res["experiment"])[-1]
    assert rec["train_dgd"] > 0
    state = torch.load(os.path.join(res["experiment"], "last.pt"), weights_only=True)
    assert any(k.endswith("attn.q_norm.gamma") for k in state["model"])


def test_vvtq_reports_oscillations_and_regulariser(float_ckpt: str, tmp_path: Path) -> None:
    res = run_qat(
        "vvtq",
        float_ckpt,
        model="vit_nano_patch4_28",
        output=str(tmp_path),
        method_args={"wbits": 2, "abits": 4, "reg": True, "reg_start": 0.0, "osc_momentum": 0.2},
        **{**TINY, "epochs": 2},
    )
    log = _log(res["experiment"])
    assert all("osc_pct" in r and "frozen_pct" in r for r in log)
    assert log[-1]["train_penalty"] > 0
    state = torch.load(os.path.join(res["experiment"], "last.pt"), weights_only=True)
    assert any(k.endswith("q_proj.weight") for k in state["model"])


def test_vvtq_soft_labels_multi_crop(float_ckpt: str, tmp_path: Path) -> None:
    folder = str(tmp_path / "sl")
    meta = make_softlabels(
        float_ckpt, folder, data_path="digits", train_subset=64, num_crops=4, topk=3
    )
    assert meta["num_images"] == 64 and meta["num_classes"] == 10
    res = run_qat(
        "vvtq",
        float_ckpt,
        model="vit_nano_patch4_28",
        output=str(tmp_path),
        method_args={"wbits": 4, "abits": 4, "softlabel_path": folder, "num_crops": 2},
        **{**TINY, "train_subset": 64, "batch_size": 16},
    )
    assert _log(res["experiment"])[-1]["train_soft_ce"] > 0
    with pytest.raises(DataError, match="images"):
        run_qat(
            "vvtq",
            float_ckpt,
            model="vit_nano_patch4_28",
            output=str(tmp_path),
            method_args={"softlabel_path": folder},
            **{**TINY, "train_subset": 96},
        )


def test_ft_qat_runs_with_kd(float_ckpt: str, tmp_path: Path) -> None:
    res = run_qat(
        "ft-qat",
        float_ckpt,
        model="vit_nano_patch4_28",
        output=str(tmp_path),
        method_args={"wbits": 8, "abits": 8, "calib_batches": 2},
        **TINY,
    )
    assert "train_kd" in _log(res["experiment"])[-1]


def test_bad_input(float_ckpt: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="wbits"):
        run_qat(
            "lsq",
            float_ckpt,
            model="vit_nano_patch4_28",
            output=str(tmp_path),
            method_args={"wbits": 9},
            **TINY,
        )
    with pytest.raises(CheckpointError):
        run_qat("lsq", float_ckpt, model="vit_micro_patch4_28", output=str(tmp_path), **TINY)
    from vitquant.models import create_model

    teacher = tmp_path / "teacher100.pt"
    torch.save({"model": create_model("vit_nano_patch4_28", num_classes=100).state_dict()}, teacher)
    with pytest.raises(ConfigError, match="classes"):
        run_qat(
            "qvit",
            float_ckpt,
            model="vit_nano_patch4_28",
            output=str(tmp_path),
            teacher=str(teacher),
            teacher_model="vit_nano_patch4_28",
            **TINY,
        )


_SCRIPT = """
import sys, torch
from vitquant.train.qat_run import run_qat
stop = int(sys.argv[3]) if len(sys.argv) > 3 else None
kw = dict(data_path="digits", train_subset=128, eval_subset=64, batch_size=32, epochs=2,
          save_every_steps=1, method_args={"wbits": 3, "abits": 3, "reg": True}, quiet=True)
from vitquant.methods import build_method
from vitquant.train.config import TrainConfig
from vitquant.train.trainer import fit
from vitquant.train.qat_run import QAT_DEFAULTS
cfg = TrainConfig(**{**QAT_DEFAULTS, **{k: v for k, v in kw.items() if k != "quiet"},
                     "model": "vit_nano_patch4_28", "method": "vvtq", "finetune": sys.argv[1],
                     "output": sys.argv[2], "name": "run"})
fit(cfg, quiet=True, stop_after_steps=stop)
"""


def _run(args: list[str], nproc: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master-port",
            str(29500 + os.getpid() % 500),
        ]
    else:
        cmd = [sys.executable]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_resumed_run_ends_where_uninterrupted_does(float_ckpt: str, tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = _run([str(script), float_ckpt, a])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run([str(script), float_ckpt, b, "5"])
    assert r.returncode == 17, r.stderr[-2000:]
    r = _run([str(script), float_ckpt, b])
    assert r.returncode == 0, r.stderr[-2000:]
    sa = torch.load(next(Path(a).rglob("run/last.pt")), weights_only=True)["model"]
    sb = torch.load(next(Path(b).rglob("run/last.pt")), weights_only=True)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        if torch.is_tensor(sa[k]):
            torch.testing.assert_close(sa[k], sb[k], msg=k)


@pytest.mark.slow
def test_torchrun_two_processes(float_ckpt: str, tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    r = _run([str(script), float_ckpt, str(tmp_path / "ddp")], nproc=2)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    res = json.loads(next((tmp_path / "ddp").rglob("run/result.json")).read_text())
    assert res["epochs"] == 2 and res["top1"] is not None


def test_cli_softlabels_and_bad_bits(float_ckpt: str, tmp_path: Path, capsys) -> None:
    from vitquant.cli import main

    out = str(tmp_path / "sl")
    code = main(
        [
            "softlabels",
            "--teacher",
            float_ckpt,
            "--data-path",
            "digits",
            "--train-subset",
            "16",
            "--num-crops",
            "2",
            "--topk",
            "3",
            "--output",
            out,
        ]
    )
    assert code == 0
    assert json.loads(open(os.path.join(out, "meta.json")).read())["num_images"] == 16
    code = main(
        [
            "train",
            "--model",
            "vit_nano_patch4_28",
            "--data-path",
            "digits",
            "--method",
            "lsq",
            "--wbits",
            "1",
            "--output",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert "wbits" in capsys.readouterr().err

"""The ``diffq`` training method and the ``vitquant diffq`` front end, on a tiny ViT and digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitquant.cli import main
from vitquant.errors import ConfigError
from vitquant.methods import build_method
from vitquant.methods.diffq import (
    LSQ,
    DiffQuantizer,
    UniformQuantizer,
    load_quantized_state,
    restore_quantized_state,
)
from vitquant.methods.diffq.method import DiffQMethodConfig, build_quantizer

RUN = [
    "--model", "vit_nano_patch4_28", "--data-path", "digits", "--epochs", "1", "--",
    "--train-subset", "128", "--eval-subset", "64", "--batch-size", "64", "--warmup-epochs", "0",
    "--quiet",
]  # fmt: skip


def test_config_modes() -> None:
    assert DiffQMethodConfig(penalty=1).mode() == "diffq"
    assert DiffQMethodConfig(bits=4).mode() == "qat"
    assert DiffQMethodConfig(bits=4, lsq=True).mode() == "lsq"
    with pytest.raises(ConfigError, match="not both"):
        build_method("diffq", {"penalty": 1.0, "bits": 4})
    with pytest.raises(ConfigError, match="--lsq needs --bits"):
        build_method("diffq", {"lsq": True})
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    kinds = {"diffq": DiffQuantizer, "qat": UniformQuantizer, "lsq": LSQ}
    for cfg in (DiffQMethodConfig(min_size=0), DiffQMethodConfig(bits=3, min_size=0)):
        q = build_quantizer(model, cfg)
        assert isinstance(q, kinds[cfg.mode()])
        q.detach()
    q = build_quantizer(model, DiffQMethodConfig(bits=3, lsq=True, min_size=0))
    assert isinstance(q, LSQ)


def test_run_log_eval_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path)
    cmd = ["diffq", "run", "-p", "5", "-g", "4", "--min-size", "0.001", "--output", out, *RUN]
    assert main(cmd) == 0
    exp = tmp_path / "vit_nano_patch4_28" / "digits" / "exp_group_size=4,min_size=0.001,penalty=5"
    assert (exp / "result.json").is_file()
    records = [json.loads(line) for line in (exp / "log.jsonl").read_text().splitlines()]
    assert records[-1]["model_size_mb"] < records[-1]["float_size_mb"]
    assert "bits_per_weight" in records[-1]
    # rerunning the same command finds the finished run instead of training again
    capsys.readouterr()
    assert main(cmd) == 0
    assert main(["diffq", "log", str(exp)]) == 0
    assert "size" in capsys.readouterr().out.splitlines()[-1]
    # evaluation with the real quantized weights, then with 8-bit activations
    assert main(["diffq", "eval", str(exp), "--subset", "64"]) == 0
    plain = json.loads((exp / "eval_diffq.json").read_text())
    assert (
        main(["diffq", "eval", str(exp), "minmax_pc", "--act-samples", "2", "--subset", "64"]) == 0
    )
    act = json.loads((exp / "eval_act=minmax_pc.json").read_text())
    assert plain["images"] == act["images"] == 64
    assert plain["model_size_mb"] == pytest.approx(records[-1]["model_size_mb"])
    # export: the packed state restores the weights the run evaluated
    assert main(["diffq", "export", str(exp)]) == 0
    state = load_quantized_state(exp / "quantized.th")
    assert (exp / "quantized.th").stat().st_size <= 1.1 * plain["model_size_mb"] * 2**20 + 8192
    import vitquant

    fresh = vitquant.create_model("vit_nano_patch4_28", num_classes=10, in_chans=1)
    restore_quantized_state(fresh, state)
    last = torch.load(exp / "last.pt", weights_only=True)["model"]
    model = vitquant.create_model("vit_nano_patch4_28", num_classes=10, in_chans=1)
    q = DiffQuantizer(model, group_size=4, min_size=0.001)
    model.load_state_dict(last)
    with q.enter_quantize():
        for name, p in fresh.named_parameters():
            assert torch.equal(p, dict(model.named_parameters())[name]), name


def test_run_names_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diffq", "run", "-b", "4", "--dry-run"]) == 0
    assert "--name exp_bits=4 --bits 4" in capsys.readouterr().out
    assert main(["diffq", "run", "-b", "3", "--lsq", "-d", "--label", "x", "--dry-run"]) == 0
    line = capsys.readouterr().out
    assert "torch.distributed.run" in line and "--name exp_bits=3,lsq=true,x" in line
    assert main(["diffq", "run", "-p", "1", "-b", "4", "--output", "/nonexistent/x"]) == 2
    assert "not both" in capsys.readouterr().err


def test_nothing_to_quantize_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # every parameter of the nano ViT is under 100 MB: DiffQ has no bit logit to train
    cmd = ["diffq", "run", "-p", "1", "--min-size", "100", "--output", str(tmp_path), *RUN]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "no parameter to quantize" in err and "Traceback" not in err

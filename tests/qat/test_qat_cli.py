"""``vitquant train`` with the QAT methods from the command line: soft-label folders, ``--finetune``
across QAT model names, the distillation options of every method, and one-line errors for bad
input (in-process ``vitquant.cli.main``; tiny runs of one or two steps on the digits data)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import vitquant.methods.qat  # noqa: F401  (registers the QAT model names)
from vitquant import data as D
from vitquant.cli import main
from vitquant.methods.vvtq.softlabels import generate_softlabels, record_path
from vitquant.models import create_model
from vitquant.train import TrainConfig, fit
from vitquant.train.build import load_finetune

#: one optimizer step of 32 images, 32 evaluation images
STEP = [
    "--data-path", "digits", "--train-subset", "32", "--eval-subset", "32", "--batch-size", "32",
    "--epochs", "1", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def float_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A float ``vit_nano_patch4_28`` run folder (two steps on digits)."""
    out = tmp_path_factory.mktemp("float") / "run"
    cfg = TrainConfig(
        model="vit_nano_patch4_28",
        data_path="digits",
        train_subset=64,
        eval_subset=32,
        batch_size=32,
        epochs=1,
        warmup_epochs=0,
    )
    fit(cfg, exp_dir=out, quiet=True)
    return str(out)


@pytest.fixture(scope="module")
def softlabels(float_run: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A soft-label folder for the 32-image digits subset of seed 0, made by the CLI."""
    out = str(tmp_path_factory.mktemp("sl") / "sl")
    args = ["--data-path", "digits", "--train-subset", "32", "--num-crops", "3", "--topk", "3"]
    assert main(["softlabels", "--teacher", float_run, *args, "--output", out]) == 0
    return out


def train(tmp_path: Path, *argv: str) -> int:
    return main(["train", *STEP, "--output", str(tmp_path / "runs"), *argv])


def only_run(tmp_path: Path) -> Path:
    dirs = [p.parent for p in (tmp_path / "runs").rglob("config.yaml")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def last_log(exp: Path) -> dict:
    return json.loads((exp / "log.jsonl").read_text().splitlines()[-1])


def one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


# --- soft labels ---------------------------------------------------------------------------------
def test_softlabel_folder_trains_from_cli(float_run: str, softlabels: str, tmp_path: Path) -> None:
    args = ["--method", "vvtq", "--model", "vit_nano_patch4_28", "--finetune", float_run]
    code = train(tmp_path, *args, "--softlabel-path", softlabels, "--num-crops", "2")
    assert code == 0
    assert last_log(only_run(tmp_path))["train_soft_ce"] > 0


def test_trainer_builds_the_method_train_set(softlabels: str) -> None:
    from vitquant.methods import build_method
    from vitquant.methods.vvtq.softlabels import MultiCropSoftLabelDataset
    from vitquant.train.build import method_train_data
    from vitquant.train.data import build_train_data

    cfg = TrainConfig(data_path="digits", train_subset=32, method="vvtq")
    meth = build_method("vvtq", {"softlabel_path": softlabels, "num_crops": 2})
    data = method_train_data(cfg, meth, build_train_data(cfg, 28), 28)
    ds = data.train_set
    assert isinstance(ds, MultiCropSoftLabelDataset) and len(ds) == 32
    # the base images are the un-augmented training subset, in order
    plain = D.subset(
        D.build_dataset("digits", "train", img_size=28, train_transform=False), 32, seed=0
    )
    for i in (0, 31):
        torch.testing.assert_close(ds.dataset[i][0], plain[i][0])
    crops, targets = pickle.loads(pickle.dumps(ds))[0]  # data-loader workers may pickle it
    assert crops.shape == (2, 1, 28, 28) and targets.shape == (2, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(2))
    # without a folder the method keeps the augmented training set
    plain_meth = build_method("vvtq", {})
    base = build_train_data(cfg, 28)
    assert method_train_data(cfg, plain_meth, base, 28).train_set is base.train_set


def test_bad_softlabel_folders(
    float_run: str, softlabels: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "--method",
        "vvtq",
        "--model",
        "vit_nano_patch4_28",
        "--finetune",
        float_run,
        "--num-crops",
        "2",
    ]
    # other number of images (another --train-subset)
    code = train(tmp_path / "a", *args, "--softlabel-path", softlabels, "--train-subset", "64")
    assert code == 2
    one_line_error(capsys, "32 images", "64")
    # same number of images, but another subset (seed) of the training split
    code = train(tmp_path / "b", *args, "--softlabel-path", softlabels, "--seed", "1")
    assert code == 2
    one_line_error(capsys, "seed of the subset 0 (folder) vs 1 (run)")
    # more crops asked than recorded
    code = train(tmp_path / "c", *args, "--softlabel-path", softlabels, "--num-crops", "4")
    assert code == 2
    one_line_error(capsys, "num_crops")
    # soft labels are the distillation: a second teacher would be silently ignored
    code = train(
        tmp_path / "t", *args, "--softlabel-path", softlabels, "--teacher", float_run,
        "--distillation-type", "soft",
    )  # fmt: skip
    assert code == 2
    one_line_error(capsys, "--softlabel-path", "--distillation-type soft")
    # a record missing
    broken = tmp_path / "broken"
    shutil.copytree(softlabels, broken)
    os.remove(record_path(str(broken), 5))
    assert train(tmp_path / "d", *args, "--softlabel-path", str(broken)) == 2
    one_line_error(capsys, "misses 1 of 32", "first: 5")
    # labels of a 5-class teacher for the same images
    five = create_model("vit_nano_patch4_28", num_classes=5)
    base = D.subset(
        D.build_dataset("digits", "train", img_size=28, train_transform=False), 32, seed=0
    )
    other = str(tmp_path / "five")
    generate_softlabels(five, base, other, num_crops=2, topk=3, seed=0)
    assert train(tmp_path / "e", *args, "--softlabel-path", other) == 2
    one_line_error(capsys, "5 classes", "10")
    # not a soft-label folder
    assert train(tmp_path / "f", *args, "--softlabel-path", str(tmp_path)) == 2
    one_line_error(capsys, "meta.json")
    assert not any((tmp_path / d / "runs").exists() for d in "abcdef")  # nothing was written


# --- --finetune across model names --------------------------------------------------------------
def test_finetune_loads_base_checkpoints_into_qat_names(float_run: str) -> None:
    base = create_model("vit_nano_patch4_28", num_classes=10, in_chans=1)
    load_finetune(base, float_run, "vit_nano_patch4_28")
    base.eval()
    x = torch.randn(3, 1, 28, 28)
    for name in ("fourbits_vit_nano_patch4_28", "vit_nano_patch4_28_quant"):
        model = create_model(name, num_classes=10, in_chans=1)
        load_finetune(model, float_run, name)
        model.eval()
        torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=1e-5)
    split = create_model("vit_nano_patch4_28_quant", num_classes=10, in_chans=1)
    load_finetune(split, float_run, "vit_nano_patch4_28_quant")
    qkv = base.blocks[1].attn.qkv.weight.detach()
    torch.testing.assert_close(split.blocks[1].attn.k_proj.weight.detach(), qkv.chunk(3)[1])


def test_finetune_across_names_from_cli(float_run: str, tmp_path: Path) -> None:
    args = ["--model", "vit_nano_patch4_28_quant", "--method", "vvtq", "--finetune", float_run]
    assert train(tmp_path / "a", *args) == 0
    state = torch.load(only_run(tmp_path / "a") / "last.pt", weights_only=True)["model"]
    assert any(k.endswith("attn.q_proj.weight") for k in state)
    args = ["--model", "fourbits_vit_nano_patch4_28", "--method", "lsq", "--finetune", float_run]
    assert train(tmp_path / "b", *args) == 0
    assert yaml.safe_load((only_run(tmp_path / "b") / "config.yaml").read_text())["model"] == (
        "fourbits_vit_nano_patch4_28"
    )


def test_finetune_from_another_architecture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    micro = create_model("vit_micro_patch7_28", num_classes=10, in_chans=1)
    run = tmp_path / "micro_run"
    run.mkdir()
    torch.save(
        {"model": micro.state_dict(), "config": {"model": "vit_micro_patch7_28"}}, run / "best.pt"
    )
    args = ["--model", "fourbits_vit_nano_patch4_28", "--method", "qvit", "--finetune", str(run)]
    assert train(tmp_path, *args) == 2
    one_line_error(
        capsys, "vit_micro_patch7_28", "fourbits_vit_nano_patch4_28", "vit_nano_patch4_28"
    )
    # a foreign file (no model name): described by its depth and width
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": micro.state_dict()}, foreign)
    args = ["--model", "vit_nano_patch4_28_quant", "--method", "vvtq", "--finetune", str(foreign)]
    assert train(tmp_path, *args) == 2
    one_line_error(capsys, "depth 6, width 128", "vit_nano_patch4_28_quant", "depth 2, width 32")


# --- distillation -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lsq", "qvit", "vvtq", "ft-qat"])
def test_deit_distillation_for_every_method(float_run: str, method: str, tmp_path: Path) -> None:
    extra = ["--calib-batches", "1"] if method == "ft-qat" else []
    extra += ["--no-dgd"] if method == "qvit" else []
    args = ["--method", method, "--finetune", float_run, "--teacher", float_run, *extra]
    dist = ["--distillation-type", "soft", "--distillation-alpha", "0.3", "--distillation-tau", "2"]
    assert train(tmp_path, "--model", "vit_nano_patch4_28", *args, *dist) == 0
    exp = only_run(tmp_path)
    rec = last_log(exp)
    assert rec["train_kd"] > 0 and rec["train_ce"] > 0
    # the logged loss is DeiT's (1 - α)·CE + α·KD of the logged parts
    assert rec["train_loss"] == pytest.approx(0.7 * rec["train_ce"] + 0.3 * rec["train_kd"], 1e-4)
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert (cfg["distillation_alpha"], cfg["distillation_tau"]) == (0.3, 2.0)


@pytest.mark.parametrize("method", ["lsq", "qvit", "ft-qat"])
def test_method_loss_uses_alpha_and_tau(method: str) -> None:
    """The methods' loss with soft distillation equals DeiT's formula computed here."""
    from vitquant.methods import StepState, build_method
    from vitquant.train.losses import DistillationLoss

    torch.manual_seed(0)
    teacher = torch.nn.Linear(6, 4)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    out = torch.randn(5, 4)
    alpha, tau = 0.3, 2.5
    crit = DistillationLoss(teacher, "soft", alpha=alpha, tau=tau)
    state = StepState(epoch=0, step=0, global_step=0, steps_per_epoch=1, epochs=1, criterion=crit)
    meth = build_method(method, {"dgd": False} if method == "qvit" else {})
    loss, _ = meth.loss(out, y, x, state)
    t = teacher(x).detach()
    p_t = F.softmax(t / tau, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(out / tau, dim=1))).sum()
    want = (1 - alpha) * F.cross_entropy(out, y) + alpha * tau**2 * kl / out.numel()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_dgd_alias(float_run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", "twobits_vit_nano_patch4_28", "--finetune", float_run]
    assert train(tmp_path, *args, "--method", "qvit", "--distillation-type", "dgd") == 0
    exp = only_run(tmp_path)
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert cfg["distillation_type"] == "none" and cfg["method_args"]["dgd"] is True
    assert last_log(exp)["train_dgd"] > 0
    dgd = ["--distillation-type", "dgd"]
    assert train(tmp_path / "x", *args, "--method", "lsq", *dgd) == 2
    one_line_error(capsys, "dgd", "qvit", "'lsq'")
    assert train(tmp_path / "x", *args, "--method", "qvit", *dgd, "--no-dgd") == 2
    one_line_error(capsys, "--no-dgd")
    assert not (tmp_path / "x").exists()


def test_irm_stats_flag(float_run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitquant.methods.qvit.irm import InformationRectification
    from vitquant.train.evaluation import EvalSpec, load_model_for_eval

    args = ["--model", "vit_nano_patch4_28", "--finetune", float_run, "--method", "qvit"]
    assert train(tmp_path, *args, "--irm-stats", "token", "--no-dgd") == 0
    exp = only_run(tmp_path)
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert cfg["method_args"]["irm_stats"] == "token"
    model, _ = load_model_for_eval(EvalSpec(run_dir=str(exp)), 10, 1, torch.device("cpu"))
    irms = [m for m in model.modules() if isinstance(m, InformationRectification)]
    assert irms and all(m.stats == "token" for m in irms)
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "x", *args, "--irm-stats", "batch")
    assert e.value.code == 2 and "invalid choice: 'batch'" in capsys.readouterr().err


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lsq", "qvit", "vvtq", "ft-qat"])
def test_bits_outside_2_to_8(
    method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flag, value in (("--wbits", "9"), ("--wbits", "1"), ("--abits", "16"), ("--abits", "0")):
        assert train(tmp_path, "--method", method, flag, value) == 2
        one_line_error(capsys, flag[2:], "2")
    assert not (tmp_path / "runs").exists()


def test_teacher_with_other_classes(
    float_run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = tmp_path / "teacher100.pt"
    torch.save({"model": create_model("vit_nano_patch4_28", num_classes=100).state_dict()}, teacher)
    for method in ("lsq", "qvit"):
        args = ["--method", method, "--model", "vit_nano_patch4_28", "--finetune", float_run]
        teach = ["--teacher", str(teacher), "--teacher-model", "vit_nano_patch4_28"]
        assert train(tmp_path, *args, *teach, "--distillation-type", "hard") == 2
        one_line_error(capsys, "100 classes", "10")


# --- evaluation of QAT runs ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lsq", "qvit", "vvtq"])
def test_eval_of_a_qat_run_reproduces_its_result(
    float_run: str, tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--method", method, "--model", "vit_nano_patch4_28", "--finetune", float_run]
    assert train(tmp_path, *args, "--wbits", "3", "--abits", "3") == 0
    exp = only_run(tmp_path)
    assert main(["eval", str(exp), "--which", "last"]) == 0
    got = json.loads((exp / "eval.json").read_text())
    want = json.loads((exp / "result.json").read_text())
    assert got["method"] == method
    assert got["top1"] == pytest.approx(want["top1"]) and got["loss"] == pytest.approx(
        want["loss"], rel=1e-4
    )

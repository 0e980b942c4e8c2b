"""Recipes (``recipes/*.yaml``) and ``--config``: every shipped recipe parses and starts.

Each recipe runs for one optimizer step through the real command line (``vitquant.cli.main``),
with the ImageNet-scale parts overridden by flags: the tiny ``vit_nano_patch4_28`` on the
built-in ``digits`` data, checkpoints that the test writes. The library loader
(:func:`vitquant.train.recipes.train_config_from_recipe`) is compared with the CLI's own parsing of
the
same recipe, which converts values through argparse instead of type hints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import vitquant
import vitquant.cli as cli
from vitquant.cli._common import apply_config_file
from vitquant.cli.train import config_from_args
from vitquant.errors import ConfigError
from vitquant.train.recipes import (
    RECIPES_DIR,
    find_recipe,
    list_recipes,
    load_recipe,
    recipe_about,
    train_config_from_recipe,
)

TINY_MODEL = "vit_nano_patch4_28"
RECIPES = list_recipes()
TRAIN = [n for n in RECIPES if "train" in yaml.safe_load((RECIPES_DIR / f"{n}.yaml").read_text())]
CALIB = [
    n for n in RECIPES if "calibrate" in yaml.safe_load((RECIPES_DIR / f"{n}.yaml").read_text())
]

#: what every seed experiment must have a recipe for (issue 7)
EXPECTED = {
    "ft_vit_b16_ptq_ft1",
    "ft_vit_b16_ptq_ft2",
    "ft_vit_b16_qat_ft2",
    "qvit_deit_t_w4",
    "qvit_deit_s_w3",
    "qvit_deit_s_w2",
    "vvtq_deit_t_w4a4",
    "diffq_deit_b",
    "qat4_deit_b",
    "qat8_deit_b",
}


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float ``vit_nano_patch4_28`` for digits (10 classes, 1 channel): teacher and start."""
    torch.manual_seed(0)
    model = vitquant.create_model(TINY_MODEL, num_classes=10, in_chans=1)
    path = tmp_path_factory.mktemp("ckpt") / "float.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _calibrate_overrides(out: Path, float_ckpt: Path) -> list[str]:
    return [
        "--model", TINY_MODEL, "--pretrained", str(float_ckpt), "--data-path", "digits",
        "--img-size", "28", "--num-calib-batch", "1", "--calib-batchsz", "8",
        "--batch-size", "32", "--max-eval-batches", "1", "--calib-output-path", str(out),
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip


def _train_overrides(opts: dict[str, Any], out: Path, float_ckpt: Path) -> list[str]:
    """Flags replacing a recipe's ImageNet-scale options by tiny ones (one step of 16 images)."""
    argv = [
        "--model", TINY_MODEL, "--data-path", "digits", "--img-size", "28", "--epochs", "1",
        "--warmup-epochs", "0", "--batch-size", "16", "--train-subset", "16",
        "--eval-subset", "16", "--output", str(out / "runs"), "--device", "cpu", "--quiet",
    ]  # fmt: skip
    if "finetune" in opts:
        argv += ["--finetune", str(float_ckpt)]
    if "teacher" in opts:
        argv += ["--teacher", str(float_ckpt), "--teacher-model", TINY_MODEL]
    if "min_size" in opts:  # DiffQ: the tiny model's tensors are all smaller than 0.1 MB
        argv += ["--min-size", "0.001"]
    if "softlabel_path" in opts:
        argv += ["--softlabel-path", ""]
    if "calib_batches" in opts or opts.get("method") in ("qvit", "vvtq", "lsq", "ft-qat"):
        argv += ["--calib-batches", "1"]
    return argv


def _exp_dir(root: Path) -> Path:
    found = [p.parent for p in root.rglob("config.yaml")]
    assert len(found) == 1, found
    return found[0]


def test_every_seed_experiment_has_a_recipe() -> None:
    assert EXPECTED <= set(RECIPES), sorted(EXPECTED - set(RECIPES))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_described_and_names_the_real_data(name: str) -> None:
    path = find_recipe(name)
    about = recipe_about(path)
    assert about.get("title") and about.get("paper") and about.get("seed")
    assert any(f"recipes/{name}.yaml" in cmd for cmd in about["launch"])
    assert isinstance(about.get("gpus"), int) and about["gpus"] >= 1
    for command in ("calibrate", "train"):
        if name in (CALIB if command == "calibrate" else TRAIN):
            opts = load_recipe(path, command)
            assert str(opts["data_path"]).startswith("/"), "full-scale recipes name real data"
            assert vitquant.list_models(opts["model"]) == [opts["model"]]


@pytest.mark.parametrize("name", CALIB)
def test_calibrate_recipe_runs(name: str, tmp_path: Path, float_ckpt: Path) -> None:
    opts = load_recipe(find_recipe(name), "calibrate")
    argv = ["calibrate", "--config", str(find_recipe(name))]
    assert cli.main(argv + _calibrate_overrides(tmp_path, float_ckpt)) == 0
    result = json.loads((tmp_path / f"{TINY_MODEL}_calib.json").read_text())
    assert result["calib_images"] == 8 and result["model"] == TINY_MODEL
    assert result["config"]["preset"] == opts["quant_mode"]
    assert result["config"]["calibrator"] == opts["calibrator"]
    assert result["config"]["percentile"] == pytest.approx(opts["percentile"])
    assert 0 <= result["quantized"]["top1"] <= 100


@pytest.mark.parametrize("name", TRAIN)
def test_train_recipe_runs_one_step(name: str, tmp_path: Path, float_ckpt: Path) -> None:
    path = find_recipe(name)
    opts = load_recipe(path, "train")
    argv = ["train", "--config", str(path)] + _train_overrides(opts, tmp_path, float_ckpt)
    if "calibrated" in opts:  # a PTQ step first, as the recipe's launch commands do
        calib = tmp_path / "calib"
        assert (
            cli.main(["calibrate", "--config", str(path)] + _calibrate_overrides(calib, float_ckpt))
            == 0
        )
        argv += ["--calibrated", str(calib / f"{TINY_MODEL}_calib.pth")]
    assert cli.main(argv) == 0
    exp = _exp_dir(tmp_path / "runs")
    saved = yaml.safe_load((exp / "config.yaml").read_text())
    saved = saved.get("config", saved)
    assert saved["model"] == TINY_MODEL and saved["data_path"] == "digits"  # flags won
    overridden = {a[2:].replace("-", "_") for a in argv if a.startswith("--")}
    for key, value in opts.items():  # everything else is the recipe's
        if key not in overridden:
            got = saved[key] if key in saved else saved["method_args"][key]
            assert got == (pytest.approx(value) if isinstance(value, float) else value), key
    result = json.loads((exp / "result.json").read_text())
    assert 0 <= result["top1"] <= 100


@pytest.mark.parametrize("name", TRAIN)
def test_library_loader_agrees_with_the_cli(name: str) -> None:
    path = str(find_recipe(name))
    parser, subs = cli.build_parser()
    argv = ["train", "--config", path]
    args = apply_config_file(parser, subs["train"], parser.parse_args(argv), argv)
    from_cli = config_from_args(args)
    from_lib = train_config_from_recipe(path, data_path=from_cli.data_path)
    assert from_lib == from_cli
    # overrides replace the recipe's values, as flags do
    assert train_config_from_recipe(name, epochs=1, warmup_epochs=0).epochs == 1


def test_flags_override_the_recipe(tmp_path: Path) -> None:
    path = str(find_recipe("qvit_deit_t_w4"))
    parser, subs = cli.build_parser()
    argv = ["train", "--config", path, "--lr", "0.5", "--wbits", "3"]
    args = apply_config_file(parser, subs["train"], parser.parse_args(argv), argv)
    cfg = config_from_args(args)
    assert cfg.lr == 0.5 and cfg.method_args["wbits"] == 3
    assert cfg.method_args["abits"] == 4 and cfg.opt == "lamb"  # from the recipe


def test_unknown_option_names_key_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("about: {title: t}\ntrain:\n  method: qvit\n  wbitz: 4\n")
    assert cli.main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "wbitz" in err and str(recipe) in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match=r"typo\.yaml.*wbitz.*closest: wbits"):
        train_config_from_recipe(recipe)
    # an option of another method is refused too
    recipe.write_text("train:\n  method: qvit\n  penalty: 1.0\n")
    with pytest.raises(ConfigError, match="penalty"):
        train_config_from_recipe(recipe)
    assert cli.main(["train", "--config", str(recipe)]) == 2


def test_load_recipe_sections_and_flat_files(tmp_path: Path) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text("about: {title: x}\ndata-path: /d\nlr: 3e-4\n")
    assert load_recipe(flat) == {"data_path": "/d", "lr": "3e-4"}  # YAML 1.1: a string
    assert train_config_from_recipe(flat).lr == pytest.approx(3e-4)  # converted
    sectioned = tmp_path / "two.yaml"
    sectioned.write_text("calibrate: {model: a}\ntrain: {model: b, epochs: 2}\n")
    assert load_recipe(sectioned, "calibrate") == {"model": "a"}
    assert load_recipe(sectioned, "train") == {"model": "b", "epochs": 2}
    with pytest.raises(ConfigError, match="no 'eval' section.*calibrate, train"):
        load_recipe(sectioned, "eval")
    sectioned.write_text("train: {data-path: a, data_path: b}\n")
    with pytest.raises(ConfigError, match="twice"):
        load_recipe(sectioned, "train")
    for text, match in (("- 1\n", "mapping"), ("a: [\n", "not valid YAML")):
        sectioned.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_recipe(sectioned, "train")
    sectioned.write_text("!!python/object/apply:os.system ['echo no']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):  # safe_load builds no objects
        load_recipe(sectioned, "train")


def test_find_recipe_by_name_or_path() -> None:
    assert find_recipe("qvit_deit_t_w4") == RECIPES_DIR / "qvit_deit_t_w4.yaml"
    assert find_recipe("qvit_deit_t_w4.yaml") == RECIPES_DIR / "qvit_deit_t_w4.yaml"
    with pytest.raises(ConfigError, match="closest: qvit_deit_t_w4"):
        find_recipe("qvit_deit_t_w5")

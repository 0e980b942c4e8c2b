"""Experiment folder names and config checks; TrainConfig validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitquant.errors import ConfigError
from vitquant.train.config import TrainConfig
from vitquant.train.experiment import Experiment, dataset_slug, experiment_dir, experiment_name


def test_name_lists_only_changed_options_sorted() -> None:
    assert experiment_name(TrainConfig()) == "exp_default"
    cfg = TrainConfig(lr=0.002, epochs=3, num_workers=4, save_every_steps=7)
    assert experiment_name(cfg) == "exp_epochs=3,lr=0.002"
    cfg = TrainConfig(method="lsq", method_args={"wbits": 4, "abits": 8})
    assert experiment_name(cfg, {"wbits": 4, "abits": 4}) == "exp_abits=8,method=lsq"


def test_long_names_are_cut_with_a_hash() -> None:
    a = experiment_name(TrainConfig(teacher="x" * 300, teacher_model="vit_nano_patch4_28"))
    b = experiment_name(TrainConfig(teacher="x" * 299, teacher_model="vit_nano_patch4_28"))
    assert len(a) <= 120 and a != b


def test_dir_layout() -> None:
    cfg = TrainConfig(model="vit_micro_patch7_28", data_path="/usr/share/datasets/fashion-mnist/")
    assert experiment_dir(cfg) == Path("runs/vit_micro_patch7_28/fashion-mnist/exp_default")
    assert experiment_dir(cfg.replace(name="mine")).name == "mine"
    assert dataset_slug("digits") == "digits"


def test_check_config_refuses_other_options(tmp_path: Path) -> None:
    exp = Experiment(tmp_path / "e")
    cfg = TrainConfig(lr=0.01)
    exp.write_config(cfg)
    exp.check_config(cfg.replace(num_workers=3, device="cpu"))  # runtime options may differ
    with pytest.raises(ConfigError, match=r"lr=0.01 \(folder\) vs 0.02 \(now\)"):
        exp.check_config(cfg.replace(lr=0.02))


@pytest.mark.parametrize(
    "kw",
    [
        {"opt": "adam9"},
        {"epochs": 0},
        {"label_smoothing": 1.0},
        {"distillation_type": "soft"},
        {"warmup_epochs": 20.0},
        {"distillation_type": "x", "teacher": "t"},
    ],
)
def test_invalid_config(kw: dict) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**kw)


def test_from_dict_roundtrip_and_unknown() -> None:
    cfg = TrainConfig(betas=(0.8, 0.9), method_args={"a": 1})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})

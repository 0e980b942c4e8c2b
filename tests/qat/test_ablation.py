"""The QAT ablation's rows (``vitquant.demo.qat_ablation``) on a tiny float ViT and digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitquant.demo.qat_ablation import ROWS, run_row
from vitquant.train import TrainConfig, fit

TINY = dict(
    model="vit_nano_patch4_28",
    data_path="digits",
    epochs=2,
    train_subset=64,
    eval_subset=32,
    batch_size=32,
    quiet=True,
)


@pytest.fixture(scope="module")
def float_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("float") / "run"
    cfg = TrainConfig(
        model="vit_nano_patch4_28", data_path="digits", train_subset=64, eval_subset=32,
        batch_size=32, epochs=1, warmup_epochs=0,
    )  # fmt: skip
    fit(cfg, exp_dir=out, quiet=True)
    return str(out)


def test_distillation_row_uses_the_float_teacher(float_run: str, tmp_path: Path) -> None:
    rec = run_row("qvit-hard-kd", 3, float_run, output=str(tmp_path), **TINY)
    assert rec["row"] == "qvit-hard-kd" and rec["bits"] == 3 and 0 <= rec["top1"] <= 100
    cfg = yaml.safe_load((Path(rec["experiment"]) / "config.yaml").read_text())
    assert cfg["distillation_type"] == "hard" and cfg["teacher"] == float_run
    assert cfg["method_args"]["wbits"] == 3 and "distillation_type" not in cfg["method_args"]
    cmd = rec["command"]
    assert cmd.startswith("vitquant train --model vit_nano_patch4_28 --method qvit")
    assert f"--distillation-type hard --teacher {float_run}" in cmd and "--wbits 3" in cmd


def test_vvtq_row_reports_oscillations_per_epoch(float_run: str, tmp_path: Path) -> None:
    assert ROWS["vvtq-reg100-no-freeze"][1] == {"reg": True, "reg_max": 100.0, "freeze": False}
    rec = run_row("vvtq-reg100-no-freeze", 4, float_run, output=str(tmp_path), **TINY)
    for key in ("osc_pct", "frozen_pct", "flip_pct", "change_pct"):
        values = rec[f"{key}_per_epoch"]
        assert len(values) == 2 and all(0 <= v <= 100 for v in values), key
    assert rec["frozen_pct_per_epoch"] == [0.0, 0.0]  # --no-freeze
    assert "--reg --reg-max 100.0 --no-freeze" in rec["command"]


def test_heldout_top1_uses_images_outside_the_training_subset(
    float_run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitquant import data as D
    from vitquant.demo import qat_ablation as ablation

    rec = run_row("lsq", 4, float_run, output=str(tmp_path), **TINY)
    seen: list[list[int]] = []
    real_subset_cls = D.Subset

    def spy(dataset: object, indices: list[int]) -> object:
        seen.append(list(indices))
        return real_subset_cls(dataset, indices)

    monkeypatch.setattr(D, "Subset", spy)
    top1 = ablation.heldout_top1(rec["experiment"], n=40)
    assert 0 <= top1 <= 100
    full = D.build_dataset("digits", "train", img_size=28, train_transform=False)
    trained = set(D.subset(full, 64, seed=0).indices)
    picked = seen[-1]
    assert len(picked) == 40 and not trained & set(picked)


def test_seeded_rows_get_their_own_folder(float_run: str, tmp_path: Path) -> None:
    a = run_row("qvit-no-dgd", 4, float_run, output=str(tmp_path), **TINY)
    b = run_row("qvit-no-dgd", 4, float_run, output=str(tmp_path), seed=1, **TINY)
    assert a["seed"] == 0 and b["seed"] == 1
    assert Path(b["experiment"]).name == Path(a["experiment"]).name + "-s1"
    cfg = yaml.safe_load((Path(b["experiment"]) / "config.yaml").read_text())
    assert cfg["seed"] == 1 and "--seed 1" in b["command"]


def test_ft_qat_row_pins_the_seeds_bits_and_ft_qat_bits_follows_the_table(
    float_run: str, tmp_path: Path
) -> None:
    pinned = run_row("ft-qat", 4, float_run, output=str(tmp_path), **TINY)
    follows = run_row("ft-qat-bits", 4, float_run, output=str(tmp_path), **TINY)
    assert pinned["bits"] == 8 and "--wbits 8 --abits 8" in pinned["command"]
    assert follows["bits"] == 4 and "--wbits 4 --abits 4" in follows["command"]
    for rec in (pinned, follows):
        cfg = yaml.safe_load((Path(rec["experiment"]) / "config.yaml").read_text())
        assert cfg["method"] == "ft-qat" and cfg["opt"] == "sgd"
        assert cfg["method_args"]["wbits"] == rec["bits"] == cfg["method_args"]["abits"]


def test_float_and_ptq_calibrates_each_bit_width_from_the_float_model(float_run: str) -> None:
    from vitquant.demo.qat_ablation import float_and_ptq

    both = float_and_ptq(float_run, "vit_nano_patch4_28", "digits", "cpu", 64, bits=(4, 8))
    alone = float_and_ptq(float_run, "vit_nano_patch4_28", "digits", "cpu", 64, bits=(8,))
    assert set(both) == {"float", "ptq_ft2_w4a4", "ptq_ft2_w8a8"}
    assert all(0 <= v <= 100 for v in both.values())
    # the W8A8 copy is calibrated from the float model, not from the W4A4 one
    assert both["ptq_ft2_w8a8"] == alone["ptq_ft2_w8a8"] and both["float"] == alone["float"]

"""vitquant.methods.ptq.reconstruct_pass: the ``reconstruct`` calibration pass inside
``calibrate`` gives the same model as calibrating and then calling ``reconstruct`` with the
float model, runs after the other passes whatever order the config names them in, and the
``lowbit`` preset (SmoothQuant search, output-MSE ranges, reconstruction) beats plain
calibration at W4A4 on a model with injected outliers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from helpers import digits_batches, random_nano_vit
from vitquant.errors import ConfigError
from vitquant.methods.ptq import (
    ReconstructConfig,
    reconstruct,
    reconstruct_report,
    without_reconstruction,
)
from vitquant.models.outliers import inject_outliers
from vitquant.quant import QuantConfig, calibrate, prepare
from vitquant.quant.passes import build_passes
from vitquant.runtime import lower

FAST = {"iterations": 40, "batch_size": 32, "progress": False}


@pytest.fixture(scope="module")
def batches() -> list[Tensor]:
    return digits_batches()


@pytest.fixture(scope="module")
def outlier_model(batches: list[Tensor]) -> nn.Module:
    model = random_nano_vit()
    inject_outliers(model, batches, kinds=("ln", "gelu"))
    return model


def logits(model: nn.Module, batches: list[Tensor]) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x) for x in batches])


def test_pass_equals_calibrate_then_reconstruct(
    outlier_model: nn.Module, batches: list[Tensor]
) -> None:
    cfg = QuantConfig("ft1", 4, 4, passes=["reconstruct"], pass_options={"reconstruct": FAST})
    via_pass = calibrate(prepare(copy.deepcopy(outlier_model), cfg), batches, progress=False)
    plain_cfg = QuantConfig("ft1", 4, 4, passes=[])
    direct = calibrate(prepare(copy.deepcopy(outlier_model), plain_cfg), batches, progress=False)
    before = logits(direct, batches)
    reconstruct(outlier_model, direct, batches, ReconstructConfig(**FAST))
    report = reconstruct_report(via_pass)
    assert report is not None and len(report.blocks) == len(outlier_model.blocks)
    assert any(not b.kept for b in report.blocks)
    for (k, a), b in zip(via_pass.state_dict().items(), direct.state_dict().values()):
        if isinstance(a, Tensor):
            assert torch.equal(a, b), k
    assert not torch.equal(logits(via_pass, batches), before)  # it did change the model


def test_runs_after_the_other_passes() -> None:
    cfg = QuantConfig("ft1", 4, 4, passes=["reconstruct", "smooth", "output_mse"])
    assert [p.name for p in build_passes(cfg)] == ["smooth", "output_mse", "reconstruct"]
    low = without_reconstruction(QuantConfig("lowbit", 4, 4))
    assert low.effective_passes == ["smooth", "output_mse"] and low.preset == "lowbit"


def test_calibrate_without_progress_silences_the_passes_bars(
    batches: list[Tensor], capsys: pytest.CaptureFixture[str]
) -> None:
    """``calibrate(progress=False)`` turns off the bars of every pass that shows one, even
    where the config's pass options ask for them; with ``progress`` the options stand."""
    loud = {"smooth": {"alpha": 0.5, "progress": True}, "reconstruct": {**FAST, "progress": True}}
    cfg = QuantConfig("lowbit", 4, 4, pass_options=loud)
    quiet = {p.name: p for p in build_passes(cfg, progress=False)}
    assert quiet["smooth"].options["progress"] is False
    assert quiet["reconstruct"].config.progress is False  # type: ignore[attr-defined]
    shown = {p.name: p for p in build_passes(cfg)}
    assert shown["reconstruct"].config.progress is True  # type: ignore[attr-defined]
    capsys.readouterr()
    calibrate(prepare(random_nano_vit(), cfg), batches[:2], progress=False)
    assert capsys.readouterr().err == ""


def test_unknown_option_is_a_clear_error() -> None:
    cfg = QuantConfig("ft1", 4, 4, passes=["reconstruct"], pass_options={"reconstruct": {"it": 1}})
    with pytest.raises(ConfigError, match="reconstruct"):
        build_passes(cfg)


def test_lowbit_preset_beats_plain_w4a4(outlier_model: nn.Module, batches: list[Tensor]) -> None:
    ref = logits(outlier_model, batches)
    plain = calibrate(
        prepare(copy.deepcopy(outlier_model), QuantConfig("ft1", 4, 4)), batches, progress=False
    )
    cfg = QuantConfig("lowbit", 4, 4, pass_options={"reconstruct": FAST})
    assert cfg.effective_passes[-1] == "reconstruct"
    low = calibrate(prepare(copy.deepcopy(outlier_model), cfg), batches, progress=False)

    def err(m: nn.Module) -> float:
        return float((logits(m, batches) - ref).norm() / ref.norm())

    assert err(low) < 0.7 * err(plain)
    lowered = lower(copy.deepcopy(low), "reference", warn=False)
    a, b = logits(low, batches), logits(lowered, batches)
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.99

"""vitquant.quant.analyze and `vitquant analyze`: the injected outlier channel is named, the layer
reading it ranks most sensitive, the numbers match an independent PTQ, the report round-trips
through JSON, and the command writes JSON + PNG or fails with one line (exit 2)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from helpers import digits_batches, random_nano_vit
from vitquant.cli import main
from vitquant.errors import ConfigError, DataError
from vitquant.models.outliers import inject_gelu_outliers
from vitquant.quant import QuantConfig, calibrate, named_quantizers, prepare, quantization_disabled
from vitquant.quant.analyze import AnalysisReport, analyze

CONFIG = QuantConfig("ft1", wbits=8, abits=8)
FC2 = "blocks.0.mlp.fc2"


make_model = random_nano_vit


@pytest.fixture(scope="module")
def batches() -> list[Tensor]:
    return digits_batches()


@pytest.fixture(scope="module")
def injected(batches: list[Tensor]) -> tuple[nn.Module, int, AnalysisReport, AnalysisReport]:
    model = make_model()
    before = analyze(model, batches, CONFIG, progress=False)
    channel = inject_gelu_outliers(model, batches, block=0).channels[0]
    return model, channel, before, analyze(model, batches, CONFIG, progress=False, name="nano")


def test_names_the_channel_and_the_layer(
    injected: tuple[nn.Module, int, AnalysisReport, AnalysisReport],
) -> None:
    model, channel, before, report = injected
    assert before.by_sensitivity()[0].name != FC2  # not the most sensitive before injection
    point = report.point(f"{FC2}.input_quantizer")
    assert point.point == "linear_input" and point.stats.top_channels[0] == channel
    assert point.stats.ratio >= 30.0
    assert max(report.points, key=lambda p: p.stats.ratio) is point
    assert before.point(f"{FC2}.input_quantizer").stats.ratio < 5.0
    top = report.by_sensitivity()[0]
    assert top.name == FC2 and set(top.quantizers) == {
        f"{FC2}.{s}_quantizer" for s in ("input", "weight")
    }
    assert top.rel_error > 3 * report.by_sensitivity()[1].rel_error
    assert top.rel_error > 3 * before.layer(FC2).rel_error
    assert not any(True for _ in named_quantizers(model))  # analyze worked on a copy
    assert report.images == 128 and report.model == "nano" and report.config["preset"] == "ft1"


def test_numbers_match_an_independent_ptq(
    batches: list[Tensor], injected: tuple[nn.Module, int, AnalysisReport, AnalysisReport]
) -> None:
    model, _, _, report = injected
    q = prepare(copy.deepcopy(model), CONFIG)
    calibrate(q, batches, progress=False)
    quantizers = dict(named_quantizers(q))

    def rel_error() -> float:
        with torch.no_grad():
            y = torch.cat([q(x) for x in batches])
        return float((y - y_ref).norm() / y_ref.norm())

    with torch.no_grad(), quantization_disabled(q):
        y_ref = torch.cat([q(x) for x in batches])
    assert report.full["rel_error"] == pytest.approx(rel_error(), rel=1e-4)
    with quantization_disabled(q):
        for name in report.layer(FC2).quantizers:
            quantizers[name].enabled = True
        assert report.layer(FC2).rel_error == pytest.approx(rel_error(), rel=1e-4)
    point = report.point(f"{FC2}.input_quantizer")
    assert point.amax == pytest.approx(float(quantizers[f"{FC2}.input_quantizer"].amax))
    seen: list[Tensor] = []
    hook = model.get_submodule(FC2).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        for x in batches:
            model(x)
    hook.remove()
    x = torch.cat(seen).abs().reshape(-1, 64)
    assert point.stats.max == pytest.approx(float(x.max()), rel=1e-6)
    assert point.stats.percentile == pytest.approx(float(torch.quantile(x, 0.9999)), rel=0.1)


def test_json_round_trip_and_table(
    tmp_path: Path, injected: tuple[nn.Module, int, AnalysisReport, AnalysisReport]
) -> None:
    report = injected[-1]
    path = report.to_json(tmp_path / "sub" / "report.json")
    back = AnalysisReport.from_json(path)
    assert back == report and back.to_dict() == json.loads(path.read_text())
    lines = report.table().splitlines()
    rows = [ln.split()[0] for ln in lines[3 : 3 + len(report.layers)]]
    assert rows == [x.name for x in report.by_sensitivity()] and rows[0] == FC2
    assert f"{FC2}.input_quantizer" in report.table()
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DataError, match="not JSON"):
        AnalysisReport.from_json(bad)
    bad.write_text('{"points": 3}')
    with pytest.raises(DataError, match="not an analysis report"):
        AnalysisReport.from_json(bad)
    with pytest.raises(ConfigError, match="no layer"):
        report.layer("blocks.7.mlp.fc2")


def test_plot(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    injected: tuple[nn.Module, int, AnalysisReport, AnalysisReport],
) -> None:
    report = injected[-1]
    pytest.importorskip("matplotlib")
    path = report.plot(tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"vitquant\[plot\]"):
        report.plot(tmp_path / "again.png")


def test_bad_input(batches: list[Tensor]) -> None:
    model = make_model()
    with pytest.raises(DataError, match="no batches"):
        analyze(model, [], CONFIG, progress=False)
    with pytest.raises(ConfigError, match="top_k"):
        analyze(model, batches, CONFIG, top_k=0, progress=False)
    with pytest.raises(ConfigError, match="already prepared"):
        analyze(prepare(copy.deepcopy(model), CONFIG), batches, CONFIG, progress=False)


def test_cli_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    rc = main(
        [
            "analyze",
            "--model", "vit_nano_patch4_28",
            "--data-path", "digits",
            "--img-size", "28",
            "--num-calib-batch", "2",
            "--calib-batchsz", "16",
            "--quant-mode", "ft1",
            "--inject", "gelu",
            "--output", str(tmp_path),
            "--device", "cpu",
            "--no-progress",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    report = AnalysisReport.from_json(tmp_path / "vit_nano_patch4_28_analyze.json")
    assert report.images == 32 and report.config["preset"] == "ft1"
    assert report.by_sensitivity()[0].name == "blocks.1.mlp.fc2"  # where --inject put it
    assert "injected gelu outliers: blocks.1.mlp.fc2" in out and "rel.err" in out
    assert (tmp_path / "vit_nano_patch4_28_analyze.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--model", "vit_no_such_model", "--data-path", "digits"], "unknown model"),
        (["--model", "vit_nano_patch4_28", "--data-path", str(tmp_path / "nope")], "not found"),
        (["--model", "vit_nano_patch4_28", "--data-path", "digits", "--top-k", "0"], "top-k"),
        (["--data-path", "digits"], "--model is required"),
    ):
        assert main(["analyze", *argv, "--output", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.json"))

"""``torch.export`` of fake-quant and lowered int8 models (``vitquant.export.torch_export``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import vitquant
from helpers import random_nano_vit
from vitquant.errors import CheckpointError, ConfigError
from vitquant.export.torch_export import (
    export_program,
    load_program,
    program_ops,
    save_program,
)
from vitquant.quant import QuantConfig, calibrate, prepare
from vitquant.runtime import lower


@pytest.fixture(scope="module")
def calibrated() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = random_nano_vit()
    x = torch.randn(16, 1, 28, 28)
    prepare(model, QuantConfig("ft2"))
    calibrate(model, [x], method="max", progress=False)
    return model, x


def _lowered(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lower(copy.deepcopy(model), backend)


def test_fake_quant_program_equals_the_eager_model(calibrated, tmp_path) -> None:
    model, x = calibrated
    program = export_program(model, x[:1])  # a batch of one still gives a dynamic batch axis
    y = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(program.module()(y), model(y))
    assert not any("vitquant" in op for op in program_ops(program))  # plain ATen
    loaded = load_program(save_program(program, tmp_path / "fq.pt2"))
    with torch.no_grad():
        assert torch.equal(loaded.module()(y), model(y))


@pytest.mark.parametrize("backend", ["intmm", "onednn", "reference"])
def test_lowered_program_equals_the_lowered_model(calibrated, backend: str) -> None:
    model, x = calibrated
    if backend == "onednn":
        from vitquant.runtime.kernels import onednn_available

        if not onednn_available():
            pytest.skip("no oneDNN int8 linear in this torch")
    int8 = _lowered(model, backend)
    program = export_program(int8, x)
    y = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        want, got = int8(y), program.module()(y)
    assert (want - got).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    ops = program_ops(program)
    if backend == "intmm":
        assert "aten._int_mm.default" in ops  # integer GEMMs are in the graph
    if backend == "onednn":
        assert any(op.startswith("vitquant.onednn_qlinear") for op in ops)


def test_portable_int8_program_saves_and_loads(calibrated, tmp_path) -> None:
    model, x = calibrated
    int8 = _lowered(model, "intmm")
    path = save_program(export_program(int8, x), tmp_path / "int8.pt2")
    loaded = load_program(path)
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), int8(x))


def test_process_bound_programs_are_refused_by_save(calibrated, tmp_path) -> None:
    from vitquant.runtime.kernels import onednn_available

    if not onednn_available():
        pytest.skip("no oneDNN int8 linear in this torch")
    model, x = calibrated
    program = export_program(_lowered(model, "onednn"), x, dynamic_batch=False)
    with pytest.raises(ConfigError, match="backend='intmm'"):
        save_program(program, tmp_path / "bound.pt2")
    assert not (tmp_path / "bound.pt2").exists()


def test_bad_input_is_a_clear_error(tmp_path) -> None:
    model = vitquant.create_model("vit_nano_patch4_28").eval()
    prepare(model, QuantConfig("ft1"))
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ConfigError, match="never calibrated"):
        export_program(model, x)
    with pytest.raises(ConfigError, match="tensor"):
        export_program(model, [x])  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="not found"):
        load_program(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_program(tmp_path / "junk.pt2")


def test_cli_writes_a_portable_int8_program(calibrated, tmp_path, capsys) -> None:
    from vitquant import cli
    from vitquant.quant import save_calibrated

    model, x = calibrated
    calib = save_calibrated(model, tmp_path / "c.pth", model_name="vit_nano_patch4_28")
    out = tmp_path / "int8.pt2"
    argv = ["export", "--quantized", str(calib), "--format", "pt2", "--int8", "-o", str(out)]
    assert cli.main(argv) == 0
    assert "lowered int8" in capsys.readouterr().out
    program = load_program(out)
    assert "aten._int_mm.default" in program_ops(program)
    int8 = _lowered(model, "intmm")
    with torch.no_grad():
        assert torch.equal(program.module()(x), int8(x))


def test_lsq_model_exports_with_a_dynamic_batch() -> None:
    """LSQ's gradient scale reads the batch size, but only with gradients on: the program is
    traced without them, so its batch axis stays dynamic; the forward value is the same."""
    import warnings

    from vitquant.methods.qat.quantize import QATScheme, build_qat_model, init_qat

    model = build_qat_model(random_nano_vit(), QATScheme())
    x = torch.randn(4, 1, 28, 28)
    init_qat(model, [x], num_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "static batch" warning
        program = export_program(model, x)
    model.eval()
    with torch.no_grad():
        for batch in (x, x[:1], torch.randn(7, 1, 28, 28)):
            torch.testing.assert_close(program.module()(batch), model(batch))
    # with gradients (training) the grad-scaled step computes the same forward values
    y = model(x)
    with torch.no_grad():
        torch.testing.assert_close(y.detach(), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lowered", [False, True])
def test_per_token_dynamic_model_exports(lowered: bool, tmp_path) -> None:
    torch.manual_seed(0)
    model = random_nano_vit()
    x = torch.randn(8, 1, 28, 28)
    prepare(model, QuantConfig(wbits=8, abits=8, act_dynamic=True))
    calibrate(model, [x], progress=False)
    if lowered:
        model = _lowered(model, "onednn" if _onednn() else "intmm")
    program = export_program(model, x[:2])
    y = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = model(y)
        got = program.module()(y)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    if not lowered:  # the fake-quant program is plain ATen and saves
        loaded = load_program(save_program(program, tmp_path / "dyn.pt2"))
        with torch.no_grad():
            assert torch.allclose(loaded.module()(y), ref, rtol=1e-4, atol=1e-4)


def _onednn() -> bool:
    from vitquant.runtime.kernels import onednn_available

    return onednn_available()

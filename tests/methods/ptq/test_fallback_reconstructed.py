"""vitquant.methods.ptq.fallback_reconstructed: the fallback with reconstruction after it meets
its budget, and after the prune no raised layer can go back (each checked by an independent
rebuild); layers a stricter fallback raised too many are returned; budget measurement against a
direct count; bad input."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import vitquant.methods.ptq.fallback_reconstructed as fr
from helpers import digits_tensors, trained_nano
from vitquant.errors import ConfigError, DataError
from vitquant.methods.ptq.fallback import fallback
from vitquant.methods.ptq.fallback_reconstructed import fallback_with_reconstruction, meets_budget
from vitquant.models.outliers import inject_gelu_outliers
from vitquant.quant import QuantConfig, calibrate, prepare

CONFIG = QuantConfig(
    "ft1", wbits=4, abits=4, passes=["reconstruct"],
    pass_options={"reconstruct": {"iterations": 30, "batch_size": 16, "progress": False}},
)  # fmt: skip
Val = list[tuple[Tensor, Tensor]]


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, list[Tensor], Val]:
    x, y = digits_tensors()
    model = trained_nano(x, y)
    calib = [x[i : i + 64] for i in range(0, 128, 64)]
    val = [(x[i : i + 64], y[i : i + 64]) for i in range(128, 384, 64)]
    inject_gelu_outliers(model, calib, block=1, target_ratio=100.0)
    return model, calib, val


def _drop(model_float: nn.Module, model: nn.Module, val: Val) -> float:
    y = torch.cat([t for _, t in val])
    with torch.no_grad():
        f = torch.cat([model_float(x) for x, _ in val]).argmax(-1)
        q = torch.cat([model(x) for x, _ in val]).argmax(-1)
    return 100.0 * float((f == y).float().mean() - (q == y).float().mean())


def _budget(model: nn.Module, calib: list[Tensor], val: Val) -> float:
    """Half the drop of the reconstructed W4A4 model: a budget that needs raised layers."""
    full = calibrate(prepare(copy.deepcopy(model), CONFIG), calib, progress=False)
    d = _drop(model, full, val)
    assert d > 2.0  # the injected outlier costs the W4A4 model accuracy even reconstructed
    return d / 2


def _input_bits(model: nn.Module) -> dict[str, int]:
    """Bits of each layer's (first) input quantizer: Linear inputs and matmul operands."""
    out: dict[str, int] = {}
    for n, q in model.named_modules():
        layer, _, slot = n.rpartition(".")
        if slot in ("input_quantizer", "a_quantizer") and getattr(q, "enabled", False):
            out[layer] = q.bits
    return out


def _rebuild_without(model: nn.Module, res: fr.ReconstructedFallback, name: str, calib: Any):
    """Independent rebuild: prepare with the overrides of every raised layer but ``name``."""
    assert res.report is not None
    rest = [x for x in res.report.layers if x.name != name]
    cfg = dataclasses.replace(res.report, layers=rest).quant_config(CONFIG)
    return calibrate(prepare(copy.deepcopy(model), cfg), calib, progress=False)


def test_meets_the_budget_and_no_raised_layer_can_go_back(
    setup: tuple[nn.Module, list[Tensor], Val],
) -> None:
    model, calib, val = setup
    budget = _budget(model, calib, val)
    res = fallback_with_reconstruction(model, CONFIG, calib, val, max_drop=budget)
    assert res.report is not None and res.report.met and res.raised
    assert _drop(model, res.model, val) <= budget + 1e-9
    if res.reconstructed:
        for name in res.raised:  # minimal after reconstruction
            assert _drop(model, _rebuild_without(model, res, name, calib), val) > budget
    else:  # the reconstruction missed the budget: the fallback's model, without it
        assert "reconstruct" not in res.config.effective_passes
    bits = _input_bits(res.model)
    assert all(bits[name] == 8 for name in res.raised)
    assert any(b == 4 for b in bits.values())


def test_layers_raised_too_many_are_returned(
    setup: tuple[nn.Module, list[Tensor], Val], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fallback run with a far stricter budget raises layers the real budget does not need:
    the prune after reconstruction returns them to 4 bits."""
    model, calib, val = setup
    budget = _budget(model, calib, val)
    assert budget > 0.5

    def strict(*args: Any, max_drop: float, **kw: Any) -> Any:
        return fallback(*args, max_drop=0.0, max_layers=6, prune=False, **kw)

    monkeypatch.setattr(fr, "fallback", strict)
    res = fallback_with_reconstruction(model, CONFIG, calib, val, max_drop=budget)
    assert res.lowered and res.tries == len(res.raised) + len(res.lowered) >= 3
    assert _drop(model, res.model, val) <= budget + 1e-9
    bits = _input_bits(res.model)
    assert all(bits[name] == 4 for name in res.lowered)
    assert all(bits[name] == 8 for name in res.raised)


def test_met_without_fallback(setup: tuple[nn.Module, list[Tensor], Val]) -> None:
    model, calib, val = setup
    res = fallback_with_reconstruction(model, CONFIG, calib, val, max_drop=100.0)
    assert res.report is None and res.raised == [] and res.tries == 0


def test_meets_budget_counts(setup: tuple[nn.Module, list[Tensor], Val]) -> None:
    model, calib, val = setup
    q = calibrate(prepare(copy.deepcopy(model), QuantConfig("ft1", 4, 4)), calib, progress=False)
    d = _drop(model, q, val)
    assert meets_budget(model, q, val, max_drop=d)
    assert not meets_budget(model, q, val, max_drop=d - 0.2)
    with torch.no_grad():
        agree = 100.0 * float(
            torch.cat([(model(x).argmax(-1) == q(x).argmax(-1)) for x, _ in val]).float().mean()
        )
    assert meets_budget(model, q, [x for x, _ in val], target_agreement=agree)
    assert not meets_budget(model, q, val, target_agreement=agree + 0.5)


def test_bad_input(setup: tuple[nn.Module, list[Tensor], Val]) -> None:
    model, calib, val = setup
    with pytest.raises(ConfigError, match="no reconstruct pass"):
        fallback_with_reconstruction(model, QuantConfig("ft1", 4, 4), calib, val, max_drop=1)
    with pytest.raises(ConfigError, match="one budget"):
        meets_budget(model, model, val)
    with pytest.raises(DataError, match="labels"):
        meets_budget(model, model, [x for x, _ in val], max_drop=1.0)
    with pytest.raises(DataError, match="empty"):
        meets_budget(model, model, [], max_drop=1.0)

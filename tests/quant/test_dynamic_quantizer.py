"""Per-token dynamic activation quantizer (``DynamicQuantizer``, ``QuantConfig(act_dynamic=True)``):
its codes against torch's own per-channel fake quantization with scales re-derived in numpy, the
clip search, a massive-activation token that breaks one per-tensor scale and not per-token ones,
state round trips and errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import vitquant
from vitquant.errors import ConfigError
from vitquant.quant import (
    QuantConfig,
    calibrate,
    load_calibrated,
    prepare,
    save_calibrated,
)
from vitquant.quant.calibrators import NonFiniteError
from vitquant.quant.granularity import PerChannel
from vitquant.quant.quantizers import DynamicQuantizer, UniformQuantizer


def _rows(seed: int = 0) -> torch.Tensor:
    """[2, 40, 24]: tokens of very different magnitudes (one of them 200x the rest)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 40, 24, generator=g) * torch.exp(torch.randn(2, 40, 1, generator=g))
    x[0, 3] *= 200.0
    return x


def _np_grid(x: np.ndarray, bits: int, symmetric: bool, clip: float) -> tuple[np.ndarray, ...]:
    """Per-row (scale, zero point) derived independently in numpy (float64)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = np.maximum(clip * np.abs(x).max(-1), 1e-12) / qmax
        return s, np.zeros_like(s), -qmax - 1, qmax
    qmax = 2**bits - 1
    lo = np.minimum(clip * x.min(-1), 0.0)
    hi = np.maximum(clip * x.max(-1), 0.0)
    s = np.maximum((hi - lo) / qmax, 1e-12)
    z = np.clip(np.round(-lo / s), 0, qmax)
    return s, z, 0, qmax


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_codes_match_torch_per_row_fake_quant(symmetric: bool, bits: int) -> None:
    x = _rows()
    q = DynamicQuantizer(bits, symmetric=symmetric)
    q.calibrate_tensor(x, "max")
    assert q.clip == 1.0
    x2 = x.reshape(-1, x.shape[-1])
    s, z, qmin, qmax = _np_grid(x2.double().numpy(), bits, symmetric, 1.0)
    ref = torch.fake_quantize_per_channel_affine(
        x2, torch.tensor(s, dtype=torch.float32), torch.tensor(z, dtype=torch.int32), 0, qmin, qmax
    ).reshape(x.shape)
    got = q(x)
    step = torch.tensor(s, dtype=torch.float32).reshape(2, 40, 1)
    off = ((got - ref).abs() > step * 1e-3).float().mean().item()
    assert off < 1e-3  # values one float ulp from a rounding midpoint may differ by one step
    assert ((got - ref).abs() <= step * 1.001).all()
    codes = q.int_codes(x)
    assert codes.min() >= q.qmin and codes.max() <= q.qmax
    assert torch.equal(codes, torch.round(codes))


def test_a_massive_token_breaks_one_scale_not_per_token_ones() -> None:
    x = _rows()
    normal = torch.ones(2, 40, dtype=torch.bool)
    normal[0, 3] = False
    static = UniformQuantizer(8)
    static.calibrate_tensor(x, "max")
    dynamic = DynamicQuantizer(8)
    dynamic.calibrate_tensor(x, "max")

    def rel(y: torch.Tensor) -> float:
        return float((y - x)[normal].norm() / x[normal].norm())

    assert rel(static(x)) > 0.1  # the 200x token takes the grid: the other tokens round to ~0
    assert rel(dynamic(x)) < 0.01


def test_mse_calibration_clips_low_bit_rows_and_lowers_the_error() -> None:
    x = torch.randn(64, 50, 32, generator=torch.Generator().manual_seed(1))
    q = DynamicQuantizer(3)
    calibrate_like = [x[:32], x[32:]]
    q.start_calibration("mse")
    for t in calibrate_like:
        q.observe(t)
    q.finish_calibration("mse")
    assert 0.5 <= q.clip < 1.0
    full = DynamicQuantizer(3)
    full.calibrate_tensor(x, "max")
    assert float((q(x) - x).pow(2).mean()) < float((full(x) - x).pow(2).mean())
    assert "clip=" in q.range_summary()


def test_straight_through_gradient_and_identity_when_uncalibrated() -> None:
    q = DynamicQuantizer(8)
    x = torch.randn(4, 8, requires_grad=True)
    assert not q.is_calibrated
    assert q(x) is x
    q.set_clip(1.0)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # every value is inside its row's range


def test_state_dict_round_trip_and_kind_check() -> None:
    q = DynamicQuantizer(6, symmetric=False)
    q.set_clip(0.875)
    fresh = DynamicQuantizer(8)
    fresh.load_state_dict(q.state_dict())
    assert fresh.clip == 0.875 and fresh.bits == 6 and not fresh.symmetric
    x = _rows()
    assert torch.equal(fresh(x), q(x))
    with pytest.raises(ConfigError, match="dynamic"):
        UniformQuantizer(8).load_state_dict(q.state_dict())


def test_bad_use_raises_clear_errors() -> None:
    with pytest.raises(ConfigError, match="activations"):
        DynamicQuantizer(8, role="weight")
    with pytest.raises(ConfigError, match="granularity"):
        DynamicQuantizer(8, granularity=PerChannel(0))
    q = DynamicQuantizer(8)
    with pytest.raises(ConfigError, match="never calibrated"):
        _ = q.clip
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        q.set_clip(0.0)
    with pytest.raises(ConfigError, match="no fixed range"):
        q.set_range(torch.tensor(1.0))
    q.start_calibration()
    with pytest.raises(NonFiniteError, match="NaN"):
        q.observe(torch.tensor([[1.0, float("nan")]]))


def test_config_puts_dynamic_quantizers_on_linear_inputs_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="act_dynamic"):
        QuantConfig(act_dynamic="yes")  # type: ignore[arg-type]
    cfg = QuantConfig(wbits=8, abits=8, act_dynamic=True)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    kw = {"num_classes": 7}
    model = vitquant.create_model("vit_nano_patch4_28", **kw).eval()
    ref = copy.deepcopy(model)
    prepare(model, cfg)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if "quantizer" in n[-10:]}
    for name, cls in kinds.items():
        if name.endswith("input_quantizer") and "norm" not in name and "softmax" not in name:
            assert cls == "DynamicQuantizer", name
        else:
            assert cls != "DynamicQuantizer", name
    x = torch.randn(6, 1, 28, 28)
    calibrate(model, [x[:3], x[3:]], progress=False)
    with torch.no_grad():
        y, y0 = model(x), ref(x)
    assert float(torch.nn.functional.cosine_similarity(y.flatten(), y0.flatten(), 0)) > 0.999
    path = save_calibrated(model, tmp_path / "d.pth", model_name="vit_nano_patch4_28",
                           model_kwargs=kw)  # fmt: skip
    again = load_calibrated(path)
    with torch.no_grad():
        assert torch.equal(again(x), y)

"""Quantizer contract tests: STE gradients, identity when disabled/uncalibrated, qparams round
trip, granularities, log2 grids and state dicts, against torch's fake-quant ops and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitquant.errors import ConfigError, VitquantError
from vitquant.methods.repq.log2 import Log2Quantizer, Log2Sqrt2Quantizer
from vitquant.quant import primitives as P
from vitquant.quant.granularity import PerChannel, PerGroup, PerHead, PerTensor
from vitquant.quant.quantizers import QUANTIZERS, Quantizer, UniformQuantizer


def _from_qparams(x: torch.Tensor, q: Quantizer) -> torch.Tensor:
    """dequantize(quantize(x)) using only the exported QParams (what the int8 runtime sees)."""
    qp = q.qparams()
    s, z = qp.scale, qp.zero_point
    if qp.axis is not None and qp.group_size is None:
        s, z = P.expand_to(s, x, qp.axis), P.expand_to(z, x, qp.axis)
    elif qp.group_size is not None and s.dim() == 1:  # per head
        rep = qp.group_size
        s = P.expand_to(s.repeat_interleave(rep), x, qp.axis)
        z = P.expand_to(z.repeat_interleave(rep), x, qp.axis)
    elif qp.group_size is not None:  # per group: same ndim as x
        s = s.repeat_interleave(qp.group_size, dim=qp.axis)
        z = z.repeat_interleave(qp.group_size, dim=qp.axis)
    return P.dequantize(P.quantize(x, s, z, qp.qmin, qp.qmax), s, z)


def test_registry_names() -> None:
    for name in ("uniform", "log2", "log2_sqrt2"):
        assert name in QUANTIZERS
    with pytest.raises(ConfigError):
        QUANTIZERS.get("nope")


@pytest.mark.parametrize("bits", [1, 17, 3.5])
def test_bits_out_of_range(bits: float) -> None:
    with pytest.raises(ConfigError):
        UniformQuantizer(bits)  # type: ignore[arg-type]


def test_uncalibrated_and_disabled_are_identity() -> None:
    x = torch.randn(4, 5)
    q = UniformQuantizer(4)
    assert not q.is_calibrated
    assert torch.equal(q(x), x)
    q.calibrate_tensor(x)
    assert q.is_calibrated
    assert not torch.equal(q(x), x)
    q.enabled = False
    assert torch.equal(q(x), x)


def test_calibrating_observes_and_passes_through() -> None:
    q = UniformQuantizer(8)
    q.start_calibration("max")
    x = torch.randn(100) * 3
    assert torch.equal(q(x), x)
    q.finish_calibration("max")
    assert torch.isclose(q.amax, x.abs().max())
    assert torch.isclose(q.scale, x.abs().max() / 127)


def test_per_tensor_matches_torch_fake_quant_and_grad() -> None:
    x = (torch.randn(64) * 2).requires_grad_()
    q = UniformQuantizer(8)
    q.set_range(torch.tensor(1.5))
    y = q(x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(x2, float(q.scale), 0, -128, 127)
    ref.sum().backward()
    assert torch.allclose(y, ref)
    assert torch.equal(x.grad, x2.grad)  # STE: 1 inside the range, 0 outside
    assert (x.grad == 0).any() and (x.grad == 1).any()


def test_per_channel_matches_torch_and_any_axis() -> None:
    w = torch.randn(6, 5, 3)
    for axis in (0, 1, 2, -1):
        q = UniformQuantizer(6, granularity=PerChannel(axis), role="weight")
        q.calibrate_tensor(w)
        ax = axis % 3
        amax = w.abs().amax(dim=[d for d in range(3) if d != ax])
        assert torch.allclose(q.amax, amax)
        ref = torch.fake_quantize_per_channel_affine(
            w, amax / 31, torch.zeros(w.shape[ax], dtype=torch.int32), ax, -32, 31
        )
        assert torch.allclose(q(w), ref, atol=1e-6)


def test_asymmetric_unsigned_grid_matches_torch() -> None:
    x = torch.rand(200) * 3 - 0.5
    q = UniformQuantizer(4, symmetric=False)
    q.calibrate_tensor(x)
    assert not q.signed and q.qmin == 0 and q.qmax == 15
    qp = q.qparams()
    ref = torch.fake_quantize_per_tensor_affine(
        x, float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax
    )
    assert torch.allclose(q(x), ref, atol=1e-6)
    # zero is exactly representable
    assert q(torch.zeros(3)).abs().max() == 0


def test_narrow_and_unsigned_symmetric_ranges() -> None:
    assert UniformQuantizer(8, narrow=True).qmin == -127
    q = UniformQuantizer(8, signed=False)
    assert (q.qmin, q.qmax) == (0, 255)
    x = torch.rand(50)
    q.calibrate_tensor(x)
    assert torch.isclose(q.scale, x.max() / 255)
    assert (q(-x) == 0).all()


@pytest.mark.parametrize(
    "gran,shape",
    [
        (PerTensor(), (3, 8)),
        (PerChannel(0), (6, 8)),
        (PerChannel(-1), (2, 3, 8)),
        (PerHead(4, -1), (2, 3, 8)),
        (PerHead(2, 1), (2, 4, 3)),
        (PerGroup(4, -1), (6, 8)),
        (PerGroup(3, 0), (6, 4)),
    ],
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_equals_qparams_round_trip(gran: object, shape: tuple, symmetric: bool) -> None:
    x = torch.randn(shape) * torch.linspace(0.1, 3, shape[-1])
    q = UniformQuantizer(5, granularity=gran, symmetric=symmetric)
    q.calibrate_tensor(x)
    assert torch.allclose(q(x), _from_qparams(x, q), atol=1e-6)
    # error bounded by half a step of each element's own scale (max calibration: no clipping)
    step = gran.expand(q.scale, x)  # type: ignore[attr-defined]
    assert ((q(x) - x).abs() <= step / 2 + 1e-6).all()


def test_per_group_scale_shape_and_values() -> None:
    w = torch.randn(4, 12)
    q = UniformQuantizer(8, granularity=PerGroup(3, -1), role="weight")
    q.calibrate_tensor(w)
    assert q.scale.shape == (4, 4)
    ref = np.abs(w.numpy()).reshape(4, 4, 3).max(-1) / 127
    assert np.allclose(q.scale.numpy(), ref)
    assert q.qparams().group_size == 3


def test_per_head_qparams() -> None:
    x = torch.randn(2, 5, 12)
    q = UniformQuantizer(8, granularity=PerHead(3, -1))
    q.calibrate_tensor(x)
    qp = q.qparams()
    assert qp.scale.shape == (3,) and qp.group_size == 4 and qp.axis == -1
    ref = np.abs(x.numpy()).reshape(10, 3, 4).max(axis=(0, 2)) / 127
    assert np.allclose(qp.scale.numpy(), ref)


def test_percentile_clips_outliers() -> None:
    x = torch.randn(100_000)
    x[0] = 1000.0
    q = UniformQuantizer(8)
    q.start_calibration("percentile")
    q.observe(x)
    q.finish_calibration("percentile", percentile=99.9)
    assert 2.0 < float(q.amax) < 5.0


def test_nan_names_quantizer() -> None:
    q = UniformQuantizer(8)
    q.name = "blocks.3.attn.qkv.input_quantizer"
    q.start_calibration("max")
    with pytest.raises(VitquantError, match="blocks.3.attn.qkv.input_quantizer"):
        q(torch.tensor([1.0, float("nan")]))


def test_qparams_requires_calibration() -> None:
    with pytest.raises(ConfigError, match="never calibrated"):
        UniformQuantizer(8).qparams()


def test_state_dict_round_trip_rebuilds_format() -> None:
    w = torch.randn(6, 4)
    q = UniformQuantizer(4, granularity=PerChannel(0), symmetric=False, role="weight")
    q.calibrate_tensor(w)
    fresh = UniformQuantizer(8)  # different bits/granularity: the state carries them
    fresh.load_state_dict(q.state_dict())
    assert fresh.bits == 4 and not fresh.symmetric
    assert isinstance(fresh.granularity, PerChannel)
    assert torch.equal(fresh(w), q(w))


def test_penalty_and_param_groups_defaults() -> None:
    q = UniformQuantizer(8)
    assert q.penalty() is None
    assert q.param_groups() == []


def _np_log2(x: np.ndarray, s: float, bits: int, sqrt2: bool) -> np.ndarray:
    mult = 2.0 if sqrt2 else 1.0
    qmax = 2**bits - 1
    out = np.zeros_like(x)
    for i, v in np.ndenumerate(x):
        if v <= 0:
            continue
        code = min(max(np.round(-np.log2(v / s) * mult), 0), qmax)
        out[i] = 0.0 if code >= qmax else s * 2.0 ** (-code / mult)
    return out


@pytest.mark.parametrize("cls,sqrt2", [(Log2Quantizer, False), (Log2Sqrt2Quantizer, True)])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log2_matches_numpy(cls: type, sqrt2: bool, bits: int) -> None:
    a = torch.softmax(torch.randn(4, 16, 16) * 3, dim=-1)
    q = cls(bits)
    q.calibrate_tensor(a, "percentile")  # log2 always uses the max
    assert torch.isclose(q.scale, a.max())
    ref = _np_log2(a.double().numpy(), float(q.scale), bits, sqrt2)
    assert np.allclose(q(a).double().numpy(), ref, rtol=1e-5, atol=1e-12)
    qp = q.qparams()
    assert qp.kind == ("log2_sqrt2" if sqrt2 else "log2") and not qp.signed
    assert (qp.qmin, qp.qmax) == (0, 2**bits - 1)
    codes = P.log2_quantize(a, qp.scale, bits, sqrt2)
    assert torch.allclose(P.log2_dequantize(codes, qp.scale, bits, sqrt2), q(a))


def test_log2_ste_gradient() -> None:
    a = torch.softmax(torch.randn(3, 8), -1).requires_grad_()
    q = Log2Quantizer(4)
    q.calibrate_tensor(a.detach())
    q(a).sum().backward()
    assert torch.equal(a.grad, torch.ones_like(a))
    b = (a.detach() * 2).requires_grad_()  # above the scale: clipped, zero gradient
    q(b).sum().backward()
    assert (b.grad[b.detach() > q.scale] == 0).all()


def test_sqrt2_finer_than_log2() -> None:
    a = torch.softmax(torch.randn(8, 32, 32) * 2, dim=-1)
    errs = []
    for cls in (Log2Quantizer, Log2Sqrt2Quantizer):
        q = cls(4)
        q.calibrate_tensor(a)
        errs.append(float((q(a) - a).pow(2).mean()))
    assert errs[1] < errs[0]

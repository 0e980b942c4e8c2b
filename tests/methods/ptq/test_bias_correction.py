"""Bias correction (``bias_correct``): the shift against a reference built on torch's own
fake-quant ops, a zero mean output error afterwards, sequential against one-pass, the pass in a
config, lowering, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from helpers import random_nano_vit
from vitquant.errors import ConfigError, DataError
from vitquant.methods.ptq.bias_correction import correct_bias
from vitquant.quant import QuantConfig, calibrate, prepare, quantization_disabled

W4A4 = dict(preset="ft1", wbits=4, abits=4, calibrator="percentile")


@pytest.fixture(scope="module")
def batches() -> list[Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 1, 28, 28, generator=g) for _ in range(3)]


def _calibrated(model: nn.Module, batches: list[Tensor], **kw: object) -> nn.Module:
    q = prepare(copy.deepcopy(model), QuantConfig(**{**W4A4, **kw}))
    calibrate(q, batches, progress=False)
    return q


class _TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(32, 16, generator=g) * 0.3)
            self.fc2.weight.copy_(torch.randn(8, 32, generator=g) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _per_tensor(x: Tensor, amax: float, bits: int) -> Tensor:
    qmax = 2 ** (bits - 1) - 1
    return torch.fake_quantize_per_tensor_affine(x, amax / qmax, 0, -qmax - 1, qmax)


def test_shift_matches_a_fake_quant_reference() -> None:
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(64, 16, generator=g) * 2 + 0.5 for _ in range(2)]
    model = _TwoLinear()
    q = prepare(copy.deepcopy(model), QuantConfig("ft1", 4, 4, weight_granularity="tensor"))
    calibrate(q, data, progress=False)
    fc1 = q.fc1
    x = torch.cat(data)
    bits = 4
    # reference: torch's per-tensor fake quantization with the calibrated ranges
    xq = _per_tensor(x, float(fc1.input_quantizer.amax), bits)
    wq = _per_tensor(fc1.weight.detach(), float(fc1.weight_quantizer.amax), bits)
    expected = (x @ fc1.weight.detach().T - xq @ wq.T).mean(0)
    old = fc1.bias.detach().clone()
    shifts = correct_bias(q, data)
    assert [s.name for s in shifts] == ["fc1", "fc2"]
    torch.testing.assert_close(fc1.bias.detach() - old, expected, rtol=1e-4, atol=1e-5)
    assert shifts[0].max_abs_shift == pytest.approx(float(expected.abs().max()), rel=1e-4)


def _mean_errors(q: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
    """Per layer: the mean (over rows) of its float minus quantized output, on its own input."""
    from vitquant.quant.modules import QuantLinear

    out: dict[str, list[Tensor]] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(m: QuantLinear, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            yq = m.forward(x)
            with quantization_disabled(m):
                yf = m.forward(x)
            out.setdefault(name, []).append((yf - yq).reshape(-1, yq.shape[-1]))

        return fn

    handles = [
        m.register_forward_pre_hook(hook(n))
        for n, m in q.named_modules()
        if isinstance(m, QuantLinear) and m.bias is not None and m.input_quantizer is not None
    ]
    with torch.no_grad():
        for b in batches:
            q(b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).mean(0) for n, v in out.items()}


def test_sequential_correction_leaves_no_mean_error(batches: list[Tensor]) -> None:
    q = _calibrated(random_nano_vit(), batches)
    before = _mean_errors(q, batches)
    old = {n: q.get_submodule(n).bias.detach().clone() for n in before}
    shifts = correct_bias(q, batches)
    after = _mean_errors(q, batches)  # on the inputs the corrected earlier layers give
    assert len(shifts) == len(before) >= 8
    for name in before:
        # the layer's output against its float output with the old bias: mean error - shift
        shift = q.get_submodule(name).bias.detach() - old[name]
        left = after[name] - shift
        assert float(left.abs().max()) < 1e-5 + 1e-3 * float(after[name].abs().max()), name
    assert max(float(v.abs().max()) for v in before.values()) > 1e-3  # there was an error


def test_one_pass_matches_sequential_on_the_first_layer_only(batches: list[Tensor]) -> None:
    base = _calibrated(random_nano_vit(), batches)
    seq, one = copy.deepcopy(base), copy.deepcopy(base)
    s_seq = correct_bias(seq, batches)
    s_one = correct_bias(one, batches, sequential=False)
    assert [s.name for s in s_seq] == [s.name for s in s_one]
    first = s_seq[0].name
    torch.testing.assert_close(
        seq.get_submodule(first).bias, one.get_submodule(first).bias, rtol=0, atol=1e-6
    )
    last = s_seq[-1].name
    assert not torch.allclose(seq.get_submodule(last).bias, one.get_submodule(last).bias)


def test_the_pass_runs_inside_calibrate_after_output_mse(batches: list[Tensor]) -> None:
    model = random_nano_vit()
    plain = _calibrated(model, batches, passes=["output_mse"])
    corrected = _calibrated(model, batches, passes=["bias_correct", "output_mse"])
    # same ranges (bias correction ran last, after output_mse chose them); different biases
    for (n, a), (_, b) in zip(plain.named_buffers(), corrected.named_buffers(), strict=True):
        if n.endswith("amax"):
            torch.testing.assert_close(a, b, msg=n)
    fc = "blocks.0.mlp.fc1"
    assert not torch.equal(plain.get_submodule(fc).bias, corrected.get_submodule(fc).bias)
    ref = copy.deepcopy(plain)
    correct_bias(ref, batches)
    torch.testing.assert_close(corrected.get_submodule(fc).bias, ref.get_submodule(fc).bias)


def test_corrected_model_lowers(batches: list[Tensor]) -> None:
    from vitquant.runtime import lower

    q = _calibrated(random_nano_vit(), batches, wbits=8, abits=8, preset="robust")
    correct_bias(q, batches)
    low = lower(copy.deepcopy(q), warn=False)
    x = batches[0]
    with torch.no_grad():
        a, b = q(x), low(x)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert float(cos) > 0.99


def test_layers_without_bias_are_left_alone(batches: list[Tensor]) -> None:
    model = _TwoLinear()
    model.fc1.bias = None
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(32, 16, generator=g)]
    q = prepare(copy.deepcopy(model), QuantConfig("ft1", 4, 4))
    calibrate(q, data, progress=False)
    assert [s.name for s in correct_bias(q, data)] == ["fc2"]
    assert q.fc1.bias is None


def test_bad_input() -> None:
    model = _TwoLinear()
    data = [torch.randn(32, 16)]
    q = prepare(copy.deepcopy(model), QuantConfig("ft1", 8, 8))
    calibrate(q, data, progress=False)
    with pytest.raises(DataError, match="at least one"):
        correct_bias(q, [])
    with pytest.raises(ConfigError, match="fc3"):
        correct_bias(q, data, layers=["fc3"])
    cfg = QuantConfig(passes=["bias_correct"], pass_options={"bias_correct": {"iters": 3}})
    with pytest.raises(ConfigError, match="unknown option"):
        calibrate(prepare(copy.deepcopy(model), cfg), data, progress=False)
    with pytest.raises(DataError, match="non-finite"):
        correct_bias(q, [torch.full((4, 16), float("nan"))])

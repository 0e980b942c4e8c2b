"""Int8 kernels against independent references: int64 matmuls, torch's quantize ops, F.gelu."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitquant.runtime.kernels import (
    ActQ,
    PackedWeight,
    default_backend,
    int8_bmm,
    int8_linear,
    onednn_available,
    quantize_act,
)

CPU_BACKENDS = ["reference", "intmm"] + (["onednn"] if onednn_available() else [])


def _codes_to_storage(q: torch.Tensor, a: ActQ, dtype: torch.dtype) -> torch.Tensor:
    return (q + a.offset(dtype)).to(dtype)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize(
    "act",
    [ActQ(0.05, 0, -128, 127), ActQ(0.02, 17, 0, 255), ActQ(0.1, 0, -8, 7), ActQ(0.03, 0, 0, 127)],
)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_quantize_act_matches_torch_quantize(act: ActQ, dtype: torch.dtype) -> None:
    x = torch.randn(64, 33) * 4
    got = quantize_act(x, act, dtype)
    # independent reference: torch's own affine quantizer (int32 codes, then our clamp range)
    ref = torch.quantize_per_tensor(x, act.scale, act.zero_point, torch.qint32).int_repr()
    ref = ref.clamp(act.qmin, act.qmax)
    assert got.dtype == dtype
    assert torch.equal(got.long() - act.offset(dtype), ref.long())


def test_quantize_act_prescaled_paths_agree() -> None:
    a = ActQ(0.07, 3, 0, 255)
    x = torch.randn(10, 10)
    plain = quantize_act(x, a, torch.uint8)
    scaled = quantize_act(x / a.scale, a, torch.uint8, scaled=True)
    shifted = quantize_act(x / a.scale + a.zero_point, a, torch.uint8, scaled=True, shifted=True)
    assert torch.equal(plain, scaled) and torch.equal(plain, shifted)


def _setup(backend: str, m: int = 37, k: int = 64, n: int = 48):
    torch.manual_seed(1)
    act = ActQ(0.04, 0, -128, 127)
    x = torch.randn(m, k)
    w_codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w_scale = torch.rand(n) * 0.01 + 0.001
    bias = torch.randn(n)
    dtype = torch.uint8 if backend == "onednn" else torch.int8
    xq = quantize_act(x, act, dtype)
    x_codes = torch.clamp(torch.round(x / act.scale), -128, 127)
    # exact integer reference in int64, then float epilogue
    acc = x_codes.long() @ w_codes.long().t()
    ref = acc.double() * (act.scale * w_scale.double()) + bias.double()
    pw = PackedWeight(w_codes, w_scale, backend)
    return act, xq, act.zero_point + act.offset(dtype), pw, bias, ref.float()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_linear_float_out(backend: str) -> None:
    act, xq, zp, pw, bias, ref = _setup(backend)
    y = int8_linear(xq, act.scale, zp, pw, bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_linear_gelu_residual(backend: str) -> None:
    act, xq, zp, pw, bias, ref = _setup(backend)
    other = torch.randn_like(ref)
    y = int8_linear(xq, act.scale, zp, pw, bias, post="gelu")
    torch.testing.assert_close(y, F.gelu(ref), rtol=1e-4, atol=1e-5)
    y = int8_linear(xq, act.scale, zp, pw, bias, other=other.clone())
    torch.testing.assert_close(y, ref + other, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.int8])
def test_int8_linear_requantized_out(backend: str, out_dtype: torch.dtype) -> None:
    act, xq, zp, pw, bias, ref = _setup(backend)
    out = ActQ(float(ref.abs().max()) / 100, 0, -128, 127)  # saturates the largest values
    y = int8_linear(xq, act.scale, zp, pw, bias, out=out, out_dtype=out_dtype)
    expect = torch.clamp(torch.round(ref / out.scale), -128, 127)
    diff = (y.long() - out.offset(out_dtype) - expect.long()).abs()
    assert y.dtype == out_dtype
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # only float ties may differ


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_linear_w_scale_override_and_3d(backend: str) -> None:
    act, xq, zp, pw, bias, ref = _setup(backend, m=24)
    y = int8_linear(xq.reshape(2, 12, -1), act.scale, zp, pw, bias, w_scale=pw.scale * 2)
    expect = (ref - bias) * 2 + bias
    torch.testing.assert_close(y.reshape(24, -1), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "intmm"])
@pytest.mark.parametrize("zps", [(0, 0), (5, 0), (0, -3), (7, 2)])
def test_int8_bmm_matches_int64(backend: str, zps: tuple[int, int]) -> None:
    a = torch.randint(-128, 128, (2, 3, 17, 40), dtype=torch.int8)
    b = torch.randint(-128, 128, (2, 3, 40, 9), dtype=torch.int8)
    got = int8_bmm(a, zps[0], b, zps[1], backend)
    ref = (a.long() - zps[0]) @ (b.long() - zps[1])
    assert torch.equal(got.long(), ref)


def test_int8_bmm_transposed_operand() -> None:
    a = torch.randint(-128, 128, (4, 20, 16), dtype=torch.int8)
    k = torch.randint(-128, 128, (4, 20, 16), dtype=torch.int8)
    got = int8_bmm(a, 0, k.transpose(-2, -1), 0, "intmm")
    assert torch.equal(got.long(), a.long() @ k.long().transpose(-2, -1))


def test_default_backend() -> None:
    assert default_backend("cpu") in ("onednn", "intmm")


@pytest.mark.gpu
def test_intmm_on_cuda_matches_reference() -> None:
    act, xq, zp, pw, bias, ref = _setup("intmm", m=64)
    pw = pw.to("cuda")
    y = int8_linear(xq.cuda(), act.scale, zp, pw, bias.cuda())
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)

"""``QuantMatMul``'s integer product: without gradients, two per-tensor uniform grids give the
int8 runtime's value (numpy's exact int64 sum of the codes, cast to float32, times the scale
product rounded to float32), bit for bit and whatever the summation order; close to the product
of the dequantized operands; the plain product wherever gradients, other grids or stand-in
forwards are involved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitquant.methods.repq.log2 import Log2Quantizer
from vitquant.quant import QuantMatMul
from vitquant.quant.granularity import PerChannel
from vitquant.quant.quantizers import UniformQuantizer


def _av(bits: int = 4, seed: int = 0) -> tuple[QuantMatMul, torch.Tensor, torch.Tensor]:
    """attn·v with calibrated grids: unsigned probabilities, signed v; [2, 3, 50, 50] @ [.., 16]."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(2, 3, 50, 50, generator=g), -1)
    v = torch.randn(2, 3, 50, 16, generator=g)
    m = QuantMatMul("av")
    m.a_quantizer = UniformQuantizer(bits, signed=False)
    m.b_quantizer = UniformQuantizer(bits)
    m.a_quantizer.calibrate_tensor(p, "max")
    m.b_quantizer.calibrate_tensor(v, "max")
    return m, p, v


def _runtime_value(m: QuantMatMul, p: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    qa, qb = m.a_quantizer, m.b_quantizer
    assert qa is not None and qb is not None
    ca = (qa.int_codes(p) - qa.zero_point).numpy().astype(np.int64)
    cb = (qb.int_codes(v) - qb.zero_point).numpy().astype(np.int64)
    mul = np.float32(float(qa.scale) * float(qb.scale))  # the runtime's Python-float product
    return np.matmul(ca, cb).astype(np.float32) * mul


@pytest.mark.parametrize("bits", [4, 8])
def test_integer_product_is_the_runtimes_value(bits: int) -> None:
    m, p, v = _av(bits)
    with torch.no_grad():
        got = m(p, v)
        plain = m.a_quantizer(p) @ m.b_quantizer(v)  # type: ignore[misc]
    assert np.array_equal(got.numpy(), _runtime_value(m, p, v))
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-7)
    perm = torch.randperm(50)  # the tokens summed in another order: the same bits
    with torch.no_grad():
        assert torch.equal(m(p[..., perm], v[..., perm, :]), got)


def test_gradients_and_other_grids_use_the_plain_product() -> None:
    m, p, v = _av()
    qa, qb = m.a_quantizer, m.b_quantizer
    assert qa is not None and qb is not None
    plain = qa(p) @ qb(v)
    p.requires_grad_(True)
    out = m(p, v)
    assert torch.equal(out, plain)
    out.sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():
        assert m.integer_product(qa(p), qb(v)) is not None
        qa.forward = lambda x: x  # type: ignore[method-assign]  # a stand-in (reconstruction)
        assert m.integer_product(p, qb(v)) is None
        del qa.forward
        per_channel = UniformQuantizer(4, granularity=PerChannel(-1))
        per_channel.calibrate_tensor(v, "max")
        m.b_quantizer = per_channel
        assert m.integer_product(qa(p), per_channel(v)) is None
        assert torch.equal(m(p, v), qa(p) @ per_channel(v))
        log2 = Log2Quantizer(4)
        log2.calibrate_tensor(p, "max")
        m.a_quantizer, m.b_quantizer = log2, qb
        assert m.integer_product(log2(p), qb(v)) is None
        assert torch.equal(m(p, v), log2(p) @ qb(v))
        m.a_quantizer, m.b_quantizer = qa, None
        assert torch.equal(m(p, v), qa(p) @ v)

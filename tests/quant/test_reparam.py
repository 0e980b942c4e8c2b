"""RepQ-ViT LayerNorm reparameterisation: float function preserved, and per-tensor quantization of
the folded activation reproduces per-channel quantization of the original one exactly."""

from __future__ import annotations

import torch

import vitquant
from vitquant.quant import QuantConfig, calibrate, prepare, quantization_disabled
from vitquant.quant import primitives as P
from vitquant.quant.reparam import apply_reparam, find_pairs


def _model() -> torch.nn.Module:
    m = vitquant.create_model("vit_nano_patch4_28").eval()
    with torch.no_grad():  # strong inter-channel variation after the LayerNorms (as in real ViTs)
        for blk in m.blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.weight.copy_(torch.logspace(-1, 1, norm.weight.numel())[torch.randperm(32)])
                norm.bias.copy_(torch.randn(32))
    return m


def test_pairs_found() -> None:
    m = prepare(_model(), QuantConfig("repq"))
    names = sorted(p.name for p in find_pairs(m))
    assert names == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2"]


def test_reparam_preserves_float_and_is_exact_when_quantized() -> None:
    torch.manual_seed(0)
    m = _model()
    x = torch.randn(8, 1, 28, 28)
    ref = m(x)
    blk = m.blocks[0]
    prepare(m, QuantConfig("repq", abits=4))
    q = blk.mlp.fc1.input_quantizer
    calibrate(m, [x], method="max", progress=False)
    assert q.scale.dim() == 0  # per tensor after folding
    with quantization_disabled(m):
        assert torch.allclose(m(x), ref, atol=1e-5)

    # Independent check on one pair: per-channel asymmetric quantization of the original LN output
    # (min/max per channel, numpy-free re-derivation) against per-tensor quantization after folding.
    torch.manual_seed(1)
    m2 = _model()
    norm, fc1 = m2.blocks[0].norm2, m2.blocks[0].mlp.fc1
    h = torch.randn(8, 17, 32) * 3
    xo = norm(h).detach()
    flat = xo.reshape(-1, 32)
    s, z = P.qparams_from_minmax(flat.amin(0), flat.amax(0), 4)
    xq = P.dequantize(P.quantize(xo, s, z, 0, 15), s, z)
    y_ref = torch.nn.functional.linear(xq, fc1.weight, fc1.bias)

    prepare(m2, QuantConfig("repq", abits=4))
    q2 = m2.blocks[0].mlp.fc1.input_quantizer
    q2.start_calibration("max")
    q2.observe(xo)
    q2.finish_calibration("max")
    pairs = [p for p in find_pairs(m2) if p.name == "blocks.0.norm2"]
    assert apply_reparam(pairs) == 1
    with torch.no_grad():
        y = fc1(norm(h))  # fc1's input quantizer is active, per tensor
    assert torch.allclose(y, y_ref, atol=1e-4)


def test_ln_reparam_helps_at_low_bits() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    errs = {}
    for reparam in (False, True):
        m = _model()
        ref = m(x)
        cfg = QuantConfig("ft1", wbits=8, abits=4, ln_reparam=reparam, act_symmetric=False)
        prepare(m, cfg)
        calibrate(m, [x], method="max", progress=False)
        errs[reparam] = float((m(x) - ref).detach().pow(2).mean())
    assert errs[True] < errs[False]

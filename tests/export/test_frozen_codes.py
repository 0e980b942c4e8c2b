"""One source of integer codes: export, ``lower`` and the fake-quant forward agree.

The case that used to differ is VVTQ with frozen weights: the oscillation tracker replaces the
codes of oscillating weights by frozen values that rounding the float weight no longer gives, so
anything that recomputed ``round(w / s)`` (the packed export, the int8 runtime) lost them.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vitquant
from helpers import randomize_affine
from vitquant.export.io import load_quantized, model_size_report, save_quantized, size_report
from vitquant.methods.qat.quantize import QATScheme, build_qat_model, init_qat
from vitquant.methods.vvtq.quantizer import VVTQQuantizer
from vitquant.quant import QuantLinear
from vitquant.quant.bitpack import unpack
from vitquant.quant.granularity import PerChannel
from vitquant.quant.quantizers import build_quantizer
from vitquant.runtime import Int8Linear, lower


def _freeze_by_oscillation(lin: nn.Linear, q: VVTQQuantizer, gen: torch.Generator) -> None:
    """Drives ``q``'s tracker until a fifth of the weights freeze, then moves the latent weights.

    The frozen weights oscillate between two neighbouring codes (the tracker freezes them at the
    rounded moving average of their codes); afterwards their latent float weights move three
    steps, as training keeps moving latent weights, so ``round(w / s)`` no longer gives the
    frozen code.
    """
    tr = q.oscillation
    tr.momentum, tr.threshold = 0.5, 0.3
    w = lin.weight.detach().clone()
    s = q.expanded(q.scale.detach(), w)
    mask = (torch.rand(w.shape, generator=gen) < 0.2).float()
    q.train()
    with torch.enable_grad():
        for t in range(6):
            q(w + (t % 2) * s * mask)
    q.eval()
    with torch.no_grad():
        lin.weight.copy_(w + 3 * s * mask * torch.where(w > 0, -1.0, 1.0))


@pytest.fixture(scope="module")
def frozen_model() -> nn.Module:
    """A W4A8 VVTQ-quantized nano ViT (fused qkv, so whole blocks lower) with frozen weights,
    LayerScale and random biases, LayerNorms and gammas."""
    torch.manual_seed(0)
    m = randomize_affine(vitquant.create_model("vit_nano_patch4_28", init_values=0.5))
    build_qat_model(m, QATScheme(wbits=4, abits=8, weight_quantizer="vvtq"))
    init_qat(m, [torch.randn(8, 1, 28, 28) for _ in range(2)], num_batches=2, method="max")
    gen = torch.Generator().manual_seed(1)
    for lin in _vvtq_linears(m).values():
        _freeze_by_oscillation(lin, lin.weight_quantizer, gen)
    return m.eval()


def _vvtq_linears(m: nn.Module) -> dict[str, QuantLinear]:
    return {
        n: mod
        for n, mod in m.named_modules()
        if isinstance(mod, QuantLinear) and isinstance(mod.weight_quantizer, VVTQQuantizer)
    }


def _fake_quant_codes(lin: QuantLinear) -> torch.Tensor:
    """``round(w_hat / s)``: the codes the fake-quant forward really multiplies with."""
    q = lin.weight_quantizer
    with torch.no_grad():
        w_hat = q(lin.weight)
        return torch.round(w_hat / q.expanded(q.scale.detach(), w_hat)).long()


def test_frozen_weights_differ_from_rounding(frozen_model: nn.Module) -> None:
    """The set-up is meaningful: many frozen codes are not what rounding the weight gives."""
    lins = _vvtq_linears(frozen_model)
    assert len(lins) == 9  # 2 blocks x 4 linears and the head
    for lin in lins.values():
        q = lin.weight_quantizer
        frozen = q.oscillation.frozen
        assert frozen.float().mean() > 0.1
        s = q.expanded(q.scale, lin.weight)
        rounded = torch.clamp(torch.round(lin.weight / s), q.qmin, q.qmax)
        fq = _fake_quant_codes(lin)
        assert (fq[frozen] != rounded[frozen].long()).float().mean() > 0.5
        assert torch.equal(fq[frozen], q.oscillation.frozen_int[frozen].long())
        assert torch.equal(fq[~frozen], rounded[~frozen].long())


def test_export_and_lower_store_the_fake_quant_codes(frozen_model: nn.Module, tmp_path: Path):
    path = save_quantized(frozen_model, tmp_path / "vvtq.safetensors")
    tensors = load_file(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = lower(copy.deepcopy(frozen_model), "reference", fuse=False)
    for name, lin in _vvtq_linears(frozen_model).items():
        expect = _fake_quant_codes(lin)
        q = lin.weight_quantizer
        packed = tensors[f"{name}.weight::codes"]
        exported = unpack(packed, q.bits, expect.numel()).long().reshape(expect.shape) + q.qmin
        assert torch.equal(exported, expect), name
        int8 = low.get_submodule(name)
        assert isinstance(int8, Int8Linear)
        assert torch.equal(int8.weight.codes.long(), expect), name
    # the fused blocks hold the same codes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = lower(copy.deepcopy(frozen_model), "reference")
    qkv = frozen_model.blocks[0].attn.qkv
    assert torch.equal(fused.blocks[0].attn.qkv.weight.codes.long(), _fake_quant_codes(qkv))


def test_loaded_export_keeps_codes_and_logits(frozen_model: nn.Module, tmp_path: Path) -> None:
    path = save_quantized(frozen_model, tmp_path / "vvtq.safetensors")
    loaded = load_quantized(path)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), frozen_model(x), rtol=0, atol=1e-5)
    for name, lin in _vvtq_linears(frozen_model).items():
        assert torch.equal(_fake_quant_codes(loaded.get_submodule(name)), _fake_quant_codes(lin))


def test_export_leaves_out_oscillation_state(frozen_model: nn.Module, tmp_path: Path) -> None:
    """The trackers' statistics (several floats per weight) are training state: the frozen codes
    are in the packed codes, so an export holds neither the trackers nor their sizes."""
    path = save_quantized(frozen_model, tmp_path / "vvtq.safetensors")
    assert not [k for k in load_file(str(path)) if ".oscillation." in k]
    rep = size_report(path)
    assert not [n for n, _ in rep["float_tensors"] if ".oscillation." in n]
    packed = {
        f"{n}.weight": lin.weight_quantizer.bits for n, lin in _vvtq_linears(frozen_model).items()
    }
    packed["patch_embed.proj.weight"] = frozen_model.patch_embed.proj.weight_quantizer.bits
    true = 0
    for key, t in frozen_model.state_dict().items():
        if not torch.is_tensor(t) or ".oscillation." in key:
            continue
        true += (
            (t.numel() * packed[key] + 7) // 8 if key in packed else t.numel() * t.element_size()
        )
    assert rep["quantized_bytes"] == true
    assert model_size_report(frozen_model)["quantized_bytes"] == true


QUANTIZERS = [
    ("uniform", {"granularity": PerChannel(0)}),
    ("uniform", {"symmetric": False}),
    ("lsq", {"granularity": PerChannel(0)}),
    ("lsq+", {}),
    ("qvit", {}),
    ("vvtq", {"granularity": PerChannel(0)}),
    ("log2", {}),
    ("log2_sqrt2", {}),
]


@pytest.mark.parametrize("name,kw", QUANTIZERS)
def test_fake_quant_dequantizes_int_codes(name: str, kw: dict) -> None:
    """For every quantizer, the forward's output is the dequantized :meth:`int_codes`."""
    from vitquant.quant import primitives as P

    torch.manual_seed(0)
    q = build_quantizer(name, bits=4, **kw)
    x = torch.randn(16, 24) * 2
    if name.startswith("log2"):
        x = x.abs() / 4
    q.calibrate_tensor(x)
    codes = q.int_codes(x)
    assert codes.shape == x.shape
    assert torch.equal(codes, torch.round(codes)) and codes.min() >= q.qmin
    assert codes.max() <= q.qmax
    s = q.expanded(q.scale.detach(), x)
    if name.startswith("log2"):
        ref = P.log2_dequantize(codes, s, q.bits, name == "log2_sqrt2")
    else:
        ref = (codes - q.expanded(q.zero_point.detach(), x)) * s
    torch.testing.assert_close(q(x), ref, rtol=1e-6, atol=1e-7)


def test_int_codes_leave_the_tracker_alone(frozen_model: nn.Module) -> None:
    """Export and lowering read codes in any mode: reading them records no training step."""
    lin = frozen_model.blocks[0].mlp.fc1
    q = lin.weight_quantizer
    before = {k: v.clone() for k, v in q.oscillation.state_dict().items()}
    q.train()
    try:
        with torch.enable_grad():
            codes = q.int_codes(lin.weight + 0.3 * q.scale.detach().reshape(-1, 1))
    finally:
        q.eval()
    assert codes.shape == lin.weight.shape
    for k, v in q.oscillation.state_dict().items():
        assert torch.equal(v, before[k]), k

"""torchvision's ViT family (``torchvision.models.VisionTransformer``, ``vit_b_16``): every
quantization point that vitquant's own ViT has, the float function kept by ``prepare``, W8A8
close to float, and ``vitquant.runtime.lower`` agreeing with the fake-quant model.

The reference for "every point" is vitquant's ViT under the same config: both models' blocks
must hold the same quantizers (same roles, point kinds, bits and granularities) once
torchvision's names are mapped to vitquant's (``ln_1`` -> ``norm1``, the packed input projection
of ``self_attention`` -> ``attn.qkv``, ``mlp.0`` -> ``mlp.fc1``, ...).
"""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitquant
from helpers import randomize_affine
from vitquant._optional import import_torchvision
from vitquant.quant import QuantConfig, calibrate, prepare
from vitquant.quant.api import named_quantizers
from vitquant.quant.modules.torchvision import QuantEncoderBlock
from vitquant.quant.presets import POINT_KINDS
from vitquant.runtime import Int8Block, lower, lowering_report

EVERY_POINT = ["layernorm_input", "residual_input", "local_input", "matmul_output"]
# torchvision's names inside a block -> vitquant's (longest prefixes first)
_TO_VITQUANT = [
    ("self_attention.in_proj_input_quantizer", "attn.qkv.input_quantizer"),
    ("self_attention.in_proj_weight_quantizer", "attn.qkv.weight_quantizer"),
    ("self_attention.in_proj_output_quantizer", "attn.qkv.output_quantizer"),
    ("self_attention.out_proj.", "attn.proj."),
    ("self_attention.", "attn."),
    ("ln_1.", "norm1."),
    ("ln_2.", "norm2."),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.3.", "mlp.fc2."),
]


@pytest.fixture(scope="module")
def tv() -> types.ModuleType:
    return import_torchvision()


def _tiny(tv: types.ModuleType, seed: int = 0) -> nn.Module:
    """The brief's tiny torchvision ViT, with random biases/LayerNorms and a non-zero head
    (torchvision initialises the head to zero: every logit would be its bias)."""
    torch.manual_seed(seed)
    model = tv.models.VisionTransformer(
        image_size=28, patch_size=7, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    ).eval()  # fmt: skip
    randomize_affine(model, seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight *= 2.0  # non-uniform attention, so errors inside blocks reach the logits
        nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def _block_points(model: nn.Module, prefix: str, rename: bool) -> set[tuple[str, str, int, str]]:
    out = set()
    for name, q in named_quantizers(model):
        if not name.startswith(prefix):
            continue
        local = name[len(prefix) :]
        if rename:
            for old, new in _TO_VITQUANT:
                if local.startswith(old):
                    local = new + local[len(old) :]
                    break
        out.add((local, q.point, q.bits, type(q.granularity).__name__))
    return out


def _config(preset: str, every: bool, bits: int = 8) -> QuantConfig:
    return QuantConfig(preset, wbits=bits, abits=bits, enable=EVERY_POINT if every else [])


@pytest.mark.parametrize(
    "preset,every", [("ft1", False), ("ft2", False), ("robust", False), ("ft3", False),
                     ("trt", False), ("ft2", True)],
)  # fmt: skip
def test_every_point_of_vitquants_vit(tv: types.ModuleType, preset: str, every: bool) -> None:
    model = prepare(_tiny(tv), _config(preset, every))
    ref = prepare(vitquant.create_model("vit_micro_patch7_28"), _config(preset, every))
    theirs = _block_points(ref, "blocks.0.", rename=False)
    for i in range(2):
        ours = _block_points(model, f"encoder.layers.encoder_layer_{i}.", rename=True)
        assert ours == theirs, (sorted(ours ^ theirs), preset)
    assert isinstance(model.encoder.layers.encoder_layer_1, QuantEncoderBlock)
    if every:  # all kinds of point, the residual adds and LayerNorm inputs included
        kinds = {p for _, p, _, _ in _block_points(model, "encoder.layers.encoder_layer_0.", True)}
        assert kinds == set(POINT_KINDS)
    names = [n for n, _ in named_quantizers(model)]
    assert not any(n.startswith(("heads", "conv_proj", "encoder.ln.")) for n in names)


def test_vit_b_16_has_every_point_in_every_block(tv: types.ModuleType) -> None:
    with torch.device("meta"):  # the full-size model's structure, without its 86M weights
        model = tv.models.vit_b_16()
    prepare(model, _config("ft2", True))
    tiny = prepare(_tiny(tv), _config("ft2", True))
    want = _block_points(tiny, "encoder.layers.encoder_layer_0.", rename=False)
    # 4 GEMMs (in_proj, out_proj, fc1, fc2) x (input, weight, output), 2 matmuls x (a, b, output),
    # the softmax input, 2 LayerNorm inputs, 2 residual adds x (skip, branch)
    assert len(want) == 4 * 3 + 2 * 3 + 1 + 2 + 2 * 2
    for i in range(12):
        assert _block_points(model, f"encoder.layers.encoder_layer_{i}.", False) == want


def test_prepare_keeps_the_float_function_and_state(tv: types.ModuleType) -> None:
    model = _tiny(tv)
    float_model = copy.deepcopy(model)
    x = torch.randn(4, 3, 28, 28)
    keys = set(model.state_dict())
    prepare(model, _config("ft2", True))
    assert {k for k in model.state_dict() if "quantizer" not in k} == keys
    seen: list[str] = []
    for name in ("self_attention.qk_matmul", "self_attention.softmax", "add1", "add2"):
        sub = model.encoder.layers.encoder_layer_0.get_submodule(name)
        sub.register_forward_hook(lambda *a, n=name: seen.append(n))
    with torch.no_grad():
        got, want = model(x), float_model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # uncalibrated: identity
    assert sorted(seen) == ["add1", "add2", "self_attention.qk_matmul", "self_attention.softmax"]
    # the skip operand (a, FasterTransformer's residual input) of add1 is the block's input
    block = model.encoder.layers.encoder_layer_1
    taken: dict[str, torch.Tensor] = {}

    def keep(key: str, module: nn.Module) -> None:
        module.register_forward_pre_hook(lambda m, args: taken.update({key: args[0]}))

    keep("input", block)
    keep("skip", block.add1)
    keep("skip2", block.add2)
    keep("ln_2", block.ln_2)
    with torch.no_grad():
        model(x)
    assert taken["skip"] is taken["input"] and taken["skip2"] is taken["ln_2"]
    fresh = _tiny(tv, seed=1)  # torchvision's own state dict loads into the prepared model
    res = model.load_state_dict(fresh.state_dict(), strict=False)
    assert not res.unexpected_keys and all("quantizer" in k for k in res.missing_keys)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), atol=1e-5, rtol=1e-5)


def _calibrated(tv: types.ModuleType, preset: str, bits: int = 8) -> tuple[nn.Module, nn.Module]:
    model = _tiny(tv)
    float_model = copy.deepcopy(model)
    prepare(model, _config(preset, False, bits))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 3, 28, 28, generator=gen) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "smooth: no layer to smooth" would fail here
        calibrate(model, batches, progress=False)
    return model, float_model


def test_robust_smooths_every_block_and_keeps_the_float_function(tv: types.ModuleType) -> None:
    from vitquant.methods.ptq import smoothing_report
    from vitquant.quant import quantization_disabled

    model, float_model = _calibrated(tv, "robust")
    smoothed = {d.name.rsplit(".", 1)[-1] if "mlp" in d.name else "self_attention"
                for d in smoothing_report(model)}  # fmt: skip
    assert len(smoothing_report(model)) == 3 * 2 and smoothed == {"self_attention", "0", "3"}
    x = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), quantization_disabled(model):
        torch.testing.assert_close(model(x), float_model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["ft1", "ft2", "robust"])
def test_w8a8_close_to_float(tv: types.ModuleType, preset: str) -> None:
    model, float_model = _calibrated(tv, preset)
    low_bit, _ = _calibrated(tv, preset, bits=4)
    x = torch.randn(64, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, y, y4 = float_model(x), model(x), low_bit(x)
    cos = F.cosine_similarity(y, ref, dim=1)
    assert cos.min() > 0.99
    cos4 = F.cosine_similarity(y4, ref, dim=1).mean()
    assert cos4 < cos.mean() - 1e-3  # the quantizers are in the path: 4 bits is visibly worse
    assert not torch.equal(y, ref)


@pytest.mark.parametrize("preset", ["ft1", "ft2", "robust"])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_lower_agrees_with_fake_quant(
    tv: types.ModuleType, preset: str, backend: str | None
) -> None:
    model, _ = _calibrated(tv, preset)
    x = torch.randn(64, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    low = lower(copy.deepcopy(model), backend, warn=False)
    with torch.no_grad():
        fq, y = model(x), low(x)
    assert F.cosine_similarity(y, fq, dim=1).min() > 0.999
    assert (y.argmax(1) == fq.argmax(1)).float().mean() >= 0.99
    report = lowering_report(low)
    # every EncoderBlock is fused (packed in_proj as the qkv GEMM, q/k/v codes, int8 attention)
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(2)]
    assert report["blocks"] == blocks and report["kept"] == {}
    assert report["linears"] == [] and report["matmuls"] == []
    assert all(isinstance(low.get_submodule(b), Int8Block) for b in blocks)
    # unfused, op by op: the linears and matmuls, with the packed in_proj left in fake-quant
    ops = lower(copy.deepcopy(model), backend, fuse=False, warn=False)
    rep = lowering_report(ops)
    lin = [f"encoder.layers.encoder_layer_{i}.{n}" for i in range(2)
           for n in ("self_attention.out_proj", "mlp.0", "mlp.3")]  # fmt: skip
    mm = [f"encoder.layers.encoder_layer_{i}.self_attention.{n}" for i in range(2)
          for n in ("qk_matmul", "av_matmul")]  # fmt: skip
    assert sorted(rep["linears"]) == sorted(lin) and sorted(rep["matmuls"]) == sorted(mm)
    with torch.no_grad():
        assert F.cosine_similarity(ops(x), fq, dim=1).min() > 0.999

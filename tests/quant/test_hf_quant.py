"""prepare / calibrate / QAT / lower on transformers ViT and DeiT (``quant/modules/hf.py``).

References: transformers' own float forward (cosine), and vitquant's own ViT holding the same
weights (converted by ``vitquant.models.hf.from_hf``, whose logits equality is tested in
``tests/models/test_hf.py``) prepared with the same config: same quantization points, same
quantized logits, same lowered logits.
"""

from __future__ import annotations

import copy
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import HF_TINY, skip_without_transformers
from vitquant.errors import ConfigError
from vitquant.models.hf import from_hf, import_transformers, load_hf_folder
from vitquant.quant import QuantConfig, calibrate, named_quantizers, prepare
from vitquant.quant.modules import QuantHFLayer

skip_without_transformers()

TINY = {**HF_TINY, "intermediate_size": 64}
ARCHS = ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher"]
#: DeiT's heads under transformers' names (vitquant's defaults name timm's head/head_dist)
DEIT_HEADS = ["head", "head_dist", "classifier", "cls_classifier", "distillation_classifier"]
ATTENTION_OPERANDS = (
    "attn.qk_matmul.a_quantizer",
    "attn.qk_matmul.b_quantizer",
    "attn.av_matmul.a_quantizer",
    "attn.av_matmul.b_quantizer",
)


@pytest.fixture(scope="module")
def tf() -> types.ModuleType:
    return import_transformers()


def tiny_hf(tf: types.ModuleType, arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg_cls = tf.DeiTConfig if arch.startswith("DeiT") else tf.ViTConfig
    model = getattr(tf, arch)(cfg_cls(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _data(n: int = 3, b: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(b, 1, 28, 28, generator=g) for _ in range(n)]


def _config(arch: str, **kw: object) -> QuantConfig:
    if arch.startswith("DeiT"):
        kw.setdefault("head_patterns", DEIT_HEADS)
    return QuantConfig(**kw)  # type: ignore[arg-type]


def _vit_name(name: str) -> str:
    """A transformers quantizer name in vitquant's ViT's names."""
    name = re.sub(r"^(vit|deit)\.(layers|encoder\.layer)\.(\d+)\.block\.", r"blocks.\3.", name)
    return name.replace("vit.embeddings.patch_embeddings.projection", "patch_embed.proj")


def _pair(tf: types.ModuleType, arch: str, **cfg: object) -> tuple[nn.Module, nn.Module]:
    """The prepared and calibrated transformers model and vitquant ViT with its weights."""
    hf = tiny_hf(tf, arch)
    vit = from_hf(hf)
    for m in (hf, vit):
        prepare(m, _config(arch, **cfg))
        calibrate(m, _data(), progress=False)
    return hf, vit


PRESETS = ["ft1", "ft2", "ft3", "trt"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", PRESETS)
def test_points_equal_vitquant_vit(tf: types.ModuleType, arch: str, preset: str) -> None:
    hf = tiny_hf(tf, arch)
    vit = from_hf(hf)
    extra = dict(enable=["layernorm_input", "local_input", "residual_input", "softmax_input"])
    for kw in ({}, extra):
        a = prepare(copy.deepcopy(hf), _config(arch, preset=preset, **kw))
        b = prepare(copy.deepcopy(vit), _config(arch, preset=preset, **kw))
        names = sorted(_vit_name(n) for n, _ in named_quantizers(a))
        assert names == sorted(n for n, _ in named_quantizers(b))
        for i in range(TINY["num_hidden_layers"]):
            for op in ATTENTION_OPERANDS:
                assert f"blocks.{i}.{op}" in names
            if kw or preset in ("ft2", "ft3"):
                assert f"blocks.{i}.attn.softmax.input_quantizer" in names
    layers = [m for m in a.modules() if isinstance(m, QuantHFLayer)]
    assert len(layers) == TINY["num_hidden_layers"]
    assert sum(n.endswith("norm1.input_quantizer") for n in names) == TINY["num_hidden_layers"]


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_keeps_transformers_names(
    tf: types.ModuleType, arch: str, tmp_path: Path
) -> None:
    hf = tiny_hf(tf, arch)
    x = _data(1)[0]
    with torch.no_grad():
        ref = hf(x).logits
    float_state = {k: v.clone() for k, v in hf.state_dict().items()}
    prepare(hf, _config(arch))  # robust: calibrate folds SmoothQuant factors into the weights
    layer = next(m for m in hf.modules() if isinstance(m, QuantHFLayer))
    base = type(layer).__mro__[2]  # Quant<Layer>(QuantHFLayer, <Layer>): still a <Layer>
    assert base.__name__ in ("ViTLayer", "DeiTLayer") and base.__module__.startswith("transformers")
    state = hf.state_dict()
    assert {k for k in state if "quantizer" not in k} == set(float_state)
    for k, v in float_state.items():
        torch.testing.assert_close(state[k], v, atol=0, rtol=0)
    calibrate(hf, _data(), progress=False)
    with torch.no_grad():
        quant = hf(x).logits
    # the float weights of an ft1 model load into a plain transformers model, strictly
    ft1 = calibrate(
        prepare(tiny_hf(tf, arch), _config(arch, preset="ft1")), _data(), progress=False
    )
    plain = tiny_hf(tf, arch, seed=1)
    plain.load_state_dict({k: v for k, v in ft1.state_dict().items() if "quantizer" not in k})
    plain.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_hf_folder(tmp_path)(x).logits, ref, atol=0, rtol=0)
    # and load back into a prepared model (the q/k/v rows are joined again)
    other = prepare(tiny_hf(tf, arch, seed=1), _config(arch))
    other.load_state_dict(hf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x).logits, quant, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", ["ft2", "robust"])
def test_w8a8_close_to_float(tf: types.ModuleType, arch: str, preset: str) -> None:
    hf = tiny_hf(tf, arch)
    x = torch.cat(_data())
    with torch.no_grad():
        ref = hf(x).logits
    prepare(hf, _config(arch, preset=preset, wbits=8, abits=8))
    calibrate(hf, _data(), progress=False)
    with torch.no_grad():
        out = hf(x).logits
    assert not torch.equal(out, ref)  # quantization did something
    assert F.cosine_similarity(out, ref).min() > 0.99


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", ["ft1", "ft2", "ft3", "trt", "robust", "repq"])
def test_quantized_logits_equal_vitquant_vit(tf: types.ModuleType, arch: str, preset: str) -> None:
    hf, vit = _pair(tf, arch, preset=preset)
    x = torch.cat(_data(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, vit(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", ["ft1", "ft2"])
def test_lower_fuses_blocks_and_matches(tf: types.ModuleType, arch: str, preset: str) -> None:
    from vitquant.runtime import lower, lowering_report

    hf, vit = _pair(tf, arch, preset=preset)
    x = torch.cat(_data(2))
    with torch.no_grad():
        fake = hf(x).logits
        lower(hf, "reference")
        lower(vit, "reference")
        out = hf(x).logits
        torch.testing.assert_close(out, vit(x), atol=1e-5, rtol=0)
    rep = lowering_report(hf)
    assert [_vit_name(b + ".") for b in rep["blocks"]] == ["blocks.0.", "blocks.1."]
    assert rep["kept"] == {}
    # the integer path flips a few roundings of the fake-quant model (as for vitquant's ViT)
    assert F.cosine_similarity(out, fake).min() > 0.999
    assert float((out - fake).abs().max() / fake.abs().max()) < 0.05


def test_qat_trains_the_transformers_weights(tf: types.ModuleType) -> None:
    from vitquant.methods.qat.quantize import QATScheme, build_qat_model, init_qat

    hf = tiny_hf(tf, "ViTForImageClassification")
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    build_qat_model(hf, QATScheme(wbits=4, abits=4))
    init_qat(hf, _data(2), num_batches=2)
    x, y = torch.cat(_data(2)), torch.arange(16) % 5
    opt = torch.optim.SGD(hf.parameters(), lr=0.05)
    hf.train()
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(hf(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    steps = [q for n, q in named_quantizers(hf) if n.endswith("qk_matmul.a_quantizer")]
    assert steps and all(p.grad is not None for q in steps for p in q.parameters())
    after = hf.state_dict()
    key = next(k for k in before if re.search(r"0\.attention\.(k_proj|attention\.key)\.weight", k))
    assert not torch.equal(after[key], before[key])


def test_masks_are_refused(tf: types.ModuleType) -> None:
    hf = prepare(tiny_hf(tf, "ViTForImageClassification"), QuantConfig("ft1"))
    layer = next(m for m in hf.modules() if isinstance(m, QuantHFLayer))
    h = torch.randn(2, 17, 32)
    assert layer(h).shape == h.shape
    with pytest.raises(ConfigError, match="no attention or head mask"):
        layer(h, torch.zeros(2, 1, 17, 17))

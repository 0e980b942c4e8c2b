"""The transformers ViT/DeiT <-> vitquant converter (``vitquant.models.hf``), checked against
transformers' own model code on tiny random models."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import HF_TINY, randomize_affine, skip_without_transformers
from vitquant.errors import CheckpointError
from vitquant.models.hf import (
    from_hf,
    hf_to_vit_state_dict,
    import_transformers,
    load_hf_folder,
    to_hf,
    vit_from_hf_folder,
)
from vitquant.models.vit import VisionTransformer

skip_without_transformers()

TINY = HF_TINY
ARCHS = ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher"]


@pytest.fixture(scope="module")
def tf() -> types.ModuleType:
    return import_transformers()


def tiny_hf(tf: types.ModuleType, arch: str, seed: int = 0, **over: object) -> nn.Module:
    """A random transformers model whose biases, LayerNorms and tokens are all non-trivial."""
    torch.manual_seed(seed)
    cfg_cls = tf.DeiTConfig if arch.startswith("DeiT") else tf.ViTConfig
    model = getattr(tf, arch)(cfg_cls(**{**TINY, **over})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_from_hf_logits_equal(tf: types.ModuleType, arch: str) -> None:
    hf = tiny_hf(tf, arch)
    vit = from_hf(hf)
    assert isinstance(vit, VisionTransformer) and not vit.training
    assert vit.distilled == arch.startswith("DeiT")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(vit(x), hf(x).logits, atol=1e-5, rtol=0)
    if arch.startswith("DeiT"):  # each head on its own token, not only their mean
        vit.distilled_training = True
        vit.train()
        with torch.no_grad():
            cls_logits, dist_logits = vit(x)
            out = hf(x)
        torch.testing.assert_close(cls_logits, out.cls_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(dist_logits, out.distillation_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("distilled", [False, True])
def test_to_hf_logits_equal_and_round_trip(tf: types.ModuleType, distilled: bool) -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=5, embed_dim=32, depth=2,
        num_heads=2, mlp_ratio=1.5, distilled=distilled,
    )  # fmt: skip
    randomize_affine(vit).eval()
    with torch.no_grad():
        vit.pos_embed.normal_(std=0.5)
        vit.cls_token.normal_()
    hf = to_hf(vit)
    want = "DeiTForImageClassificationWithTeacher" if distilled else "ViTForImageClassification"
    assert type(hf).__name__ == want
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, vit(x), atol=1e-5, rtol=0)
    back = from_hf(hf).state_dict()
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(back[k], v, atol=0, rtol=0)


def test_qkv_rows_are_query_key_value_in_order(tf: types.ModuleType) -> None:
    hf = tiny_hf(tf, "ViTForImageClassification")
    vit = from_hf(hf)
    attn = hf.vit.layers[1].attention if hasattr(hf.vit, "layers") else None
    if attn is None:  # transformers 4 layout
        attn = hf.vit.encoder.layer[1].attention.attention
        q, k, v = attn.query, attn.key, attn.value
    else:
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    rows = vit.blocks[1].attn.qkv.weight.chunk(3)
    for row, lin in zip(rows, (q, k, v)):
        assert torch.equal(row, lin.weight)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_folder(tf: types.ModuleType, arch: str, tmp_path: Path) -> None:
    hf = tiny_hf(tf, arch)
    hf.save_pretrained(tmp_path)
    loaded = load_hf_folder(tmp_path)
    assert type(loaded).__name__ == arch and not loaded.training
    x = _x()
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(loaded(x).logits, ref, atol=0, rtol=0)
        torch.testing.assert_close(vit_from_hf_folder(tmp_path)(x), ref, atol=1e-5, rtol=0)


def test_mismatched_config_is_a_checkpoint_error(tf: types.ModuleType) -> None:
    vit = from_hf(tiny_hf(tf, "ViTForImageClassification"))
    with pytest.raises(CheckpointError, match="num_attention_heads is 4 in the config, 2"):
        to_hf(vit, tf.ViTConfig(**{**TINY, "num_attention_heads": 4}))
    with pytest.raises(CheckpointError, match="needs a ViTConfig"):
        to_hf(vit, tf.DeiTConfig(**TINY))
    ok = to_hf(vit, tf.ViTConfig(**{**TINY, "layer_norm_eps": 1e-12}))
    assert type(ok).__name__ == "ViTForImageClassification"


def test_unconvertible_models_are_checkpoint_errors(tf: types.ModuleType, tmp_path: Path) -> None:
    plain_deit = tf.DeiTForImageClassification(tf.DeiTConfig(**TINY))
    with pytest.raises(CheckpointError, match="cannot convert a DeiTForImageClassification"):
        from_hf(plain_deit)
    with pytest.raises(CheckpointError, match="hidden_act='silu'"):
        from_hf(tiny_hf(tf, "ViTForImageClassification", hidden_act="silu"))
    scaled = VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=5, embed_dim=32, depth=1,
        num_heads=2, init_values=1e-3,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="LayerScale"):
        to_hf(scaled)
    with pytest.raises(CheckpointError, match="no vitquant equivalent"):
        hf_to_vit_state_dict({**tiny_hf(tf, "ViTForImageClassification").state_dict(),
                              "vit.pooler.dense.weight": torch.zeros(2, 2)})  # fmt: skip
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="BertModel"):
        load_hf_folder(tmp_path)

"""The model zoo against timm's model code: same parameter names and shapes, same logits."""

from __future__ import annotations

import pytest
import torch

import vitquant
from vitquant.errors import ConfigError


@pytest.mark.parametrize(
    "name",
    ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_base_patch16_224"],
)
def test_matches_timm(timm, name: str) -> None:
    ours = vitquant.create_model(name).eval()
    theirs = timm.create_model(name, pretrained=False).eval()
    # strictly both ways
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.nn.init.normal_(theirs.pos_embed, std=0.5)  # make both directions matter
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=0)


def test_timm_names_and_shapes(timm) -> None:
    for name in ["vit_small_patch16_384", "vit_base_patch32_224", "deit_small_patch16_224"]:
        ours = vitquant.create_model(name).state_dict()
        theirs = timm.create_model(name, pretrained=False).state_dict()
        assert {k: tuple(v.shape) for k, v in ours.items()} == {
            k: tuple(v.shape) for k, v in theirs.items()
        }


def test_registry_names() -> None:
    names = vitquant.list_models()
    for n in ["ViT-B_16", "ViT-H_14", "vit_huge_patch14_224", "deit_base_distilled_patch16_224"]:
        assert n in names
    assert vitquant.list_models("deit_*_distilled_patch16_*") == [
        "deit_base_distilled_patch16_224",
        "deit_small_distilled_patch16_224",
        "deit_tiny_distilled_patch16_224",
    ]


def test_unknown_model_lists_closest() -> None:
    with pytest.raises(ConfigError, match="deit_tiny_patch16_224"):
        vitquant.create_model("deit_tiny_patch16_22")


def test_distilled_outputs() -> None:
    m = vitquant.create_model("deit_nano_distilled_patch4_28")
    x = torch.randn(3, 1, 28, 28)
    m.train()
    m.distilled_training = True
    cls, dist = m(x)
    m.eval()
    with torch.no_grad():
        avg = m(x)
        feats = m.forward_features(x)
        ref = (m.head(feats[:, 0]) + m.head_dist(feats[:, 1])) / 2
    torch.testing.assert_close(avg, ref)
    assert cls.shape == dist.shape == (3, 10)


def test_small_configs_run() -> None:
    for name, shape in [
        ("vit_nano_patch4_28", (2, 1, 28, 28)),
        ("vit_nano_patch4_32", (2, 3, 32, 32)),
    ]:
        m = vitquant.create_model(name, num_classes=7)
        assert m(torch.randn(shape)).shape == (2, 7)

"""Float vision transformers with timm-compatible parameter names, and their factory."""

from __future__ import annotations

from vitquant.models import zoo as _zoo  # noqa: F401  (registers the entrypoints)
from vitquant.models._factory import MODELS, create_model, list_models, register_model
from vitquant.models.layers import Add, MatMul, Mlp, PatchEmbed
from vitquant.models.vit import Attention, Block, VisionTransformer

__all__ = [
    "MODELS",
    "create_model",
    "list_models",
    "register_model",
    "Add",
    "MatMul",
    "Mlp",
    "PatchEmbed",
    "Attention",
    "Block",
    "VisionTransformer",
]

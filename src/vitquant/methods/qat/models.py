"""The registry of QAT model names: each maps to the float architecture it is built from.

A method package registers its seed's names with :func:`register_qat_model` (Q-ViT's in
:mod:`vitquant.methods.qvit.models`, VVTQ's in :mod:`vitquant.methods.vvtq.models`);
:func:`base_architecture` maps each of these names to the float architecture whose checkpoints
it loads (``--finetune``); any other name maps to itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from vitquant.models import MODELS, create_model

__all__ = ["base_architecture", "register_qat_model"]

#: QAT model name -> the float architecture it is built from
_BASES: dict[str, str] = {}


def base_architecture(name: str) -> str:
    """The float architecture a model name is built from (``fourbits_vit_micro_patch7_28`` ->
    ``vit_micro_patch7_28``); a plain model name is its own base."""
    return _BASES.get(name, name)


def register_qat_model(
    name: str,
    base: str,
    doc: str,
    transform: Callable[[nn.Module], nn.Module] | None = None,
    **cfg: Any,
) -> None:
    """Registers ``name``: ``base`` built by :func:`create_model` (then ``transform``), with
    ``cfg`` and ``base_architecture`` added to its ``default_cfg``."""

    def entry(**kwargs: Any) -> nn.Module:
        model = create_model(base, **kwargs)
        if transform is not None:
            model = transform(model)
        model.default_cfg = {  # type: ignore[assignment]
            **getattr(model, "default_cfg", {}),
            **cfg,
            "base_architecture": base,
        }
        return model

    entry.__name__ = name
    entry.__doc__ = doc
    _BASES[name] = base
    if name not in MODELS:
        MODELS.add(name, entry)

"""VVTQ's model names (Huang et al., TMLR 2024), registered in :data:`vitquant.models.MODELS`.

``deit_{tiny,small,base}_patch16_224_quant``, ``vit_micro_patch7_28_quant`` and
``vit_nano_patch4_28_quant``: the float architecture with separate q/k/v projections
(:class:`~vitquant.methods.vvtq.split_attention.SplitAttention`); a fused-``qkv`` state dict loads
into them with ``model.load_state_dict`` (or :func:`load_fused_checkpoint` for files).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vitquant.methods.qat.models import register_qat_model
from vitquant.methods.vvtq.split_attention import SplitAttention, split_fused_state_dict, split_qkv

__all__ = ["has_split_attention", "load_fused_checkpoint"]

for _base in [f"deit_{s}_patch16_224" for s in ("tiny", "small", "base")] + [
    "vit_micro_patch7_28",
    "vit_nano_patch4_28",
]:
    register_qat_model(
        f"{_base}_quant",
        _base,
        f"VVTQ's {_base} with separate q/k/v projections (float architecture).",
        transform=split_qkv,
        qat_method="vvtq",
    )


def has_split_attention(model: nn.Module) -> bool:
    """True when ``model`` has VVTQ's separate q/k/v projections."""
    return any(isinstance(m, SplitAttention) for m in model.modules())


def load_fused_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Loads a fused-``qkv`` float checkpoint (timm/DeiT layout) into a split-q/k/v model.

    The checkpoint is adapted as :func:`vitquant.models.checkpoints.load_checkpoint` adapts one
    (``pos_embed`` resampled; a head of another size is left freshly initialised here, since
    this loader serves DeiT-style fine-tuning to a new class count); a checkpoint that
    already has split projections loads too.

    Raises:
        CheckpointError: unreadable file or a checkpoint of another architecture (one line,
            naming the first missing / unexpected / mismatched key).
    """
    from vitquant.errors import CheckpointError
    from vitquant.models.checkpoints import checkpoint_filter_fn, load_state_dict

    sd = checkpoint_filter_fn(split_fused_state_dict(load_state_dict(path)), model)
    own = model.state_dict()
    heads = ("head.", "head_dist.")
    missing = [k for k in own if k not in sd and not k.startswith(heads)]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        first = (missing or unexpected or bad)[0]
        arch = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
        raise CheckpointError(
            f"{path} does not fit {arch} with split q/k/v: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(bad)} mismatched keys (first: {first})"
        )
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)

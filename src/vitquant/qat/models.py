"""Model names of the QAT seeds, registered in :data:`vitquant.models.MODELS`.

* Q-ViT (Li et al., NeurIPS 2022): ``{two,three,four}bits_deit_{tiny,small,base}_patch16_224``,
  DeiT's distilled layout (class and distillation tokens, ``head`` and ``head_dist``) as Q-ViT's
  ``lowbit_VisionTransformer``; the original repository registered only the ``small`` ones. The
  demo's equivalents are ``{two,three,four}bits_vit_micro_patch7_28`` (the plain demo ViT, so that
  the demo's float checkpoint loads). They build the *float* architecture and record the bit width
  in ``default_cfg["qat_bits"]``; ``vitquant train --method qvit`` quantizes them at that width
  (``--wbits``/``--abits`` override it).
* VVTQ (Huang et al., TMLR 2024): ``deit_{tiny,small,base}_patch16_224_quant`` and
  ``vit_micro_patch7_28_quant``: the float architecture with separate q/k/v projections
  (:class:`~vitquant.qat.split_attention.SplitAttention`); a fused-``qkv`` state dict loads into
  them with ``model.load_state_dict`` (or :func:`load_fused_checkpoint` for files).
* The same names exist for the tiny test model ``vit_nano_patch4_28``
  (``{two,three,four}bits_vit_nano_patch4_28``, ``vit_nano_patch4_28_quant``).

:func:`base_architecture` maps each of these names to the float architecture whose checkpoints
it loads (``--finetune``); any other name maps to itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitquant.models import MODELS, create_model
from vitquant.qat.split_attention import split_qkv

__all__ = ["QVIT_BITS", "base_architecture", "has_split_attention", "load_fused_checkpoint"]

QVIT_BITS = {"two": 2, "three": 3, "four": 4}
#: QAT model name -> the float architecture it is built from
_BASES: dict[str, str] = {}


def base_architecture(name: str) -> str:
    """The float architecture a model name is built from (``fourbits_vit_micro_patch7_28`` ->
    ``vit_micro_patch7_28``); a plain model name is its own base."""
    return _BASES.get(name, name)


def _qvit_entry(name: str, base: str, bits: int) -> None:
    def entry(**kwargs: Any) -> nn.Module:
        model = create_model(base, **kwargs)
        model.default_cfg = {  # type: ignore[assignment]
            **getattr(model, "default_cfg", {}),
            "qat_method": "qvit",
            "qat_bits": bits,
            "base_architecture": base,
        }
        return model

    entry.__name__ = name
    entry.__doc__ = f"Q-ViT {bits}-bit {base} (float architecture; quantize with --method qvit)."
    _BASES[name] = base
    if name not in MODELS:
        MODELS.add(name, entry)


def _vvtq_entry(name: str, base: str) -> None:
    def entry(**kwargs: Any) -> nn.Module:
        model = split_qkv(create_model(base, **kwargs))
        model.default_cfg = {  # type: ignore[assignment]
            **getattr(model, "default_cfg", {}),
            "qat_method": "vvtq",
            "base_architecture": base,
        }
        return model

    entry.__name__ = name
    entry.__doc__ = f"VVTQ's {base} with separate q/k/v projections (float architecture)."
    _BASES[name] = base
    if name not in MODELS:
        MODELS.add(name, entry)


for _word, _bits in QVIT_BITS.items():
    for _size in ("tiny", "small", "base"):
        _qvit_entry(
            f"{_word}bits_deit_{_size}_patch16_224", f"deit_{_size}_distilled_patch16_224", _bits
        )
    for _small in ("vit_micro_patch7_28", "vit_nano_patch4_28"):
        _qvit_entry(f"{_word}bits_{_small}", _small, _bits)
for _size in ("tiny", "small", "base"):
    _vvtq_entry(f"deit_{_size}_patch16_224_quant", f"deit_{_size}_patch16_224")
for _small in ("vit_micro_patch7_28", "vit_nano_patch4_28"):
    _vvtq_entry(f"{_small}_quant", _small)


def has_split_attention(model: nn.Module) -> bool:
    """True when ``model`` has VVTQ's separate q/k/v projections."""
    from vitquant.qat.split_attention import SplitAttention

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
    from vitquant.qat.split_attention import split_fused_state_dict

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

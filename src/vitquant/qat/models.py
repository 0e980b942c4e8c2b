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
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..models import MODELS, create_model
from .split_attention import split_qkv

__all__ = ["QVIT_BITS", "load_fused_checkpoint"]

QVIT_BITS = {"two": 2, "three": 3, "four": 4}


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
    if name not in MODELS:
        MODELS.add(name, entry)


for _word, _bits in QVIT_BITS.items():
    for _size in ("tiny", "small", "base"):
        _qvit_entry(
            f"{_word}bits_deit_{_size}_patch16_224", f"deit_{_size}_distilled_patch16_224", _bits
        )
    _qvit_entry(f"{_word}bits_vit_micro_patch7_28", "vit_micro_patch7_28", _bits)
for _size in ("tiny", "small", "base"):
    _vvtq_entry(f"deit_{_size}_patch16_224_quant", f"deit_{_size}_patch16_224")
_vvtq_entry("vit_micro_patch7_28_quant", "vit_micro_patch7_28")


def load_fused_checkpoint(model: nn.Module, path: str) -> None:
    """Loads a fused-``qkv`` float checkpoint (timm/DeiT layout) into a split-q/k/v model.

    Raises:
        CheckpointError: unreadable file or a checkpoint of another architecture.
    """
    from ..errors import CheckpointError
    from ..models.checkpoints import load_state_dict
    from .split_attention import split_fused_state_dict

    sd = split_fused_state_dict(load_state_dict(path))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        first = (missing or unexpected or bad)[0]
        raise CheckpointError(
            f"{path} does not fit this model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(bad)} mismatched keys; first: {first})"
        )
    model.load_state_dict(sd)

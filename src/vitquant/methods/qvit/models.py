"""Q-ViT's model names (Li et al., NeurIPS 2022), registered in :data:`vitquant.models.MODELS`.

``{two,three,four}bits_deit_{tiny,small,base}_patch16_224``: DeiT's distilled layout (class and
distillation tokens, ``head`` and ``head_dist``) as Q-ViT's ``lowbit_VisionTransformer``; the
original repository registered only the ``small`` ones. The demo's equivalents are
``{two,three,four}bits_vit_micro_patch7_28`` and ``..._vit_nano_patch4_28`` (plain ViTs, so that
the demo's float checkpoint loads). They build the *float* architecture and record the bit width
in ``default_cfg["qat_bits"]``; ``vitquant train --method qvit`` quantizes them at that width
(``--wbits``/``--abits`` override it).
"""

from __future__ import annotations

from vitquant.methods.qat.models import register_qat_model

__all__ = ["QVIT_BITS"]

QVIT_BITS = {"two": 2, "three": 3, "four": 4}


def _bases() -> list[tuple[str, str]]:
    sizes = [
        (f"deit_{s}_patch16_224", f"deit_{s}_distilled_patch16_224")
        for s in ("tiny", "small", "base")
    ]
    return sizes + [(m, m) for m in ("vit_micro_patch7_28", "vit_nano_patch4_28")]


for _word, _bits in QVIT_BITS.items():
    for _stem, _base in _bases():
        register_qat_model(
            f"{_word}bits_{_stem}",
            _base,
            f"Q-ViT {_bits}-bit {_base} (float architecture; quantize with --method qvit).",
            qat_method="qvit",
            qat_bits=_bits,
        )

"""Google's JAX/Flax ViT ``.npz`` checkpoints, converted to timm's parameter names.

The layout is the one of ``google-research/vision_transformer`` (Dosovitskiy et al., 2020,
arXiv 2010.11929) that FasterTransformer's ViT seed and timm's ``_load_weights`` read:
``embedding/kernel`` (HWIO), ``cls``, ``Transformer/posembed_input/pos_embedding``,
``Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3}``, ``Transformer/encoder_norm``, ``head`` and, in the ImageNet-21k files, a
``pre_logits`` representation layer. The ``big_vision`` variants (``params/`` prefix, top-level
``pos_embedding``, sub-modules numbered 0/0/1, blocks stacked in one ``encoderblock`` array) are
read too. The result is a plain state dict; all model surgery (resampling ``pos_embed``, dropping
``pre_logits``, a new head) happens later, in
:func:`vitquant.models.checkpoints.checkpoint_filter_fn`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from vitquant.errors import CheckpointError

__all__ = ["GOOGLE_PREFIXES", "find_google_prefix", "google_to_state_dict"]

#: key prefixes of the known Google layouts (vit_jax, its optimizer dumps, big_vision)
GOOGLE_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def find_google_prefix(keys: set[str] | frozenset[str]) -> str | None:
    """The prefix of a Google-layout checkpoint (``""``, ``"params/"`` ...), ``None`` if not one."""
    for prefix in GOOGLE_PREFIXES:
        if f"{prefix}embedding/kernel" in keys:
            return prefix
    return None


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(a, copy=True))


def _dense(a: np.ndarray) -> Tensor:
    """Flax ``Dense`` kernel ``(in, out)`` to a torch ``Linear`` weight ``(out, in)``."""
    return _t(a).T.contiguous()


def google_to_state_dict(arrays: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    """Converts the arrays of a Google ViT ``.npz`` to a timm-named state dict.

    Args:
        arrays: the ``.npz`` contents, name -> array (e.g. a loaded ``np.load`` file).

    Returns:
        ``{name: tensor}`` with timm's names: ``patch_embed.proj.*``, ``cls_token``, ``pos_embed``,
        ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*``, ``norm.*``,
        ``head.*`` and ``pre_logits.fc.*`` when present. Arrays under the prefix that this
        converter does not know (e.g. a MAP head) are kept under their own names, so that a
        strict load reports them as unexpected; arrays outside the prefix (optimizer state) are
        ignored.

    Raises:
        CheckpointError: not a Google ViT layout, or an array has an unexpected shape.
    """
    keys = frozenset(arrays.keys())
    p = find_google_prefix(keys)
    if p is None:
        raise CheckpointError("not a Google ViT .npz: no 'embedding/kernel' array")
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        if p + name not in keys:
            raise CheckpointError(f"incomplete Google ViT .npz: array {p + name!r} is missing")
        used.add(p + name)
        return arrays[p + name]

    scanned = f"{p}Transformer/encoderblock/LayerNorm_0/scale" in keys
    big_vision = p.startswith("params/") or f"{p}pos_embedding" in keys or scanned
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    out: dict[str, Tensor] = {}
    try:
        kernel = get("embedding/kernel")
        if kernel.ndim != 4:
            raise CheckpointError(
                f"unsupported Google .npz: 'embedding/kernel' has shape {kernel.shape}, "
                "expected a (H, W, in, out) convolution"
            )
        out["patch_embed.proj.weight"] = _t(kernel).permute(3, 2, 0, 1).contiguous()
        if f"{p}embedding/bias" in keys:
            out["patch_embed.proj.bias"] = _t(get("embedding/bias"))
        if f"{p}cls" in keys:
            out["cls_token"] = _t(get("cls")).reshape(1, 1, -1)
        pos = (
            "pos_embedding"
            if f"{p}pos_embedding" in keys
            else "Transformer/posembed_input/pos_embedding"
        )
        if p + pos in keys:
            pe = _t(get(pos))
            out["pos_embed"] = pe.reshape(1, -1, pe.shape[-1])
        for src, dst in (("Transformer/encoder_norm", "norm"), ("head", "head")):
            if f"{p}{src}/bias" in keys:
                w = get(f"{src}/scale" if dst == "norm" else f"{src}/kernel")
                out[f"{dst}.weight"] = _t(w) if dst == "norm" else _dense(w)
                out[f"{dst}.bias"] = _t(get(f"{src}/bias"))
        if f"{p}pre_logits/kernel" in keys:
            out["pre_logits.fc.weight"] = _dense(get("pre_logits/kernel"))
            out["pre_logits.fc.bias"] = _t(get("pre_logits/bias"))

        if scanned:
            depth = arrays[f"{p}Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        else:
            pat = re.compile(re.escape(p) + r"Transformer/encoderblock_(\d+)/")
            found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
            depth = max(found) + 1 if found else 0
        for i in range(depth):
            bp = "Transformer/encoderblock/" if scanned else f"Transformer/encoderblock_{i}/"

            def blk(name: str, bp: str = bp, i: int = i) -> np.ndarray:
                a = get(bp + name)
                return a[i] if scanned else a

            b = f"blocks.{i}."
            att = f"MultiHeadDotProductAttention_{mha}/"
            out[b + "norm1.weight"] = _t(blk("LayerNorm_0/scale"))
            out[b + "norm1.bias"] = _t(blk("LayerNorm_0/bias"))
            # query/key/value kernels are (D, heads, head_dim); biases (heads, head_dim)
            qkv = [_t(blk(f"{att}{n}/kernel")) for n in ("query", "key", "value")]
            out[b + "attn.qkv.weight"] = torch.cat([w.reshape(w.shape[0], -1).T for w in qkv])
            out[b + "attn.qkv.bias"] = torch.cat(
                [_t(blk(f"{att}{n}/bias")).reshape(-1) for n in ("query", "key", "value")]
            )
            # out kernel is (heads, head_dim, D)
            o = _t(blk(f"{att}out/kernel"))
            out[b + "attn.proj.weight"] = o.reshape(-1, o.shape[-1]).T.contiguous()
            out[b + "attn.proj.bias"] = _t(blk(f"{att}out/bias"))
            out[b + "norm2.weight"] = _t(blk(f"LayerNorm_{ln2}/scale"))
            out[b + "norm2.bias"] = _t(blk(f"LayerNorm_{ln2}/bias"))
            for r in range(2):
                out[b + f"mlp.fc{r + 1}.weight"] = _dense(blk(f"MlpBlock_{mlp}/Dense_{r}/kernel"))
                out[b + f"mlp.fc{r + 1}.bias"] = _t(blk(f"MlpBlock_{mlp}/Dense_{r}/bias"))
    except (RuntimeError, ValueError, IndexError) as e:
        raise CheckpointError(f"malformed Google ViT .npz: {str(e).splitlines()[0]}") from e
    for k in sorted(keys - used):
        if k.startswith(p):
            out[k[len(p) :]] = _t(arrays[k])
    return out

"""Hugging Face ``transformers`` ViT / DeiT <-> vitquant's :class:`VisionTransformer`.

``transformers`` implements ViT (Dosovitskiy et al., arXiv 2010.11929) as
``ViTForImageClassification`` and DeiT (Touvron et al., arXiv 2012.12877) with its distillation
token as ``DeiTForImageClassificationWithTeacher``. They compute the same function as vitquant's
(timm-named) :class:`~vitquant.models.vit.VisionTransformer`, with other names and separate
query/key/value projections where vitquant has one fused ``qkv``:

==========================================================  ==================================
transformers (v5 names; v4 names in brackets)               vitquant
==========================================================  ==================================
``vit.embeddings.cls_token`` / ``distillation_token``       ``cls_token`` / ``dist_token``
``vit.embeddings.position_embeddings``                      ``pos_embed``
``vit.embeddings.patch_embeddings.projection``              ``patch_embed.proj``
``vit.layers.N`` [``vit.encoder.layer.N``]                  ``blocks.N``
``  layernorm_before`` / ``layernorm_after``                ``  norm1`` / ``norm2``
``  attention.{q,k,v}_proj`` [``attention.attention.{query,key,value}``]  ``  attn.qkv`` (rows)
``  attention.o_proj`` [``attention.output.dense``]         ``  attn.proj``
``  mlp.fc1`` / ``mlp.fc2`` [``intermediate.dense`` / ``output.dense``]  ``  mlp.fc1`` / ``fc2``
``vit.layernorm``                                           ``norm``
``classifier`` (ViT), ``cls_classifier`` / ``distillation_classifier``  ``head`` / ``head_dist``
==========================================================  ==================================

(``deit.`` replaces ``vit.`` for DeiT.) :func:`from_hf` and :func:`to_hf` convert models both
ways with equal logits; :func:`load_hf_folder` reads a local ``save_pretrained`` folder (no hub).
The per-layer part of the table (:data:`LAYER_LAYOUTS`) is also what
``vitquant.quant.modules.hf`` uses to quantize the ``transformers`` layers in place.
``transformers`` is an optional dependency (``pip install 'vitquant[hf]'``), imported only when a
function here needs it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import CheckpointError, ConfigError
from vitquant.models.vit import VisionTransformer

__all__ = [
    "LAYER_LAYOUTS",
    "SUPPORTED_ARCHITECTURES",
    "import_transformers",
    "layer_layout",
    "hf_to_vit_state_dict",
    "vit_to_hf_state_dict",
    "from_hf",
    "to_hf",
    "load_hf_folder",
    "vit_from_hf_folder",
]

#: Per-layer names: vitquant block-local module -> the ``transformers`` module(s) holding it
#: (three for the fused ``qkv``: its q, k and v row blocks), for each ``transformers`` layout.
LAYER_LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "v5": {
        "norm1": ("layernorm_before",),
        "attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        "attn.proj": ("attention.o_proj",),
        "norm2": ("layernorm_after",),
        "mlp.fc1": ("mlp.fc1",),
        "mlp.fc2": ("mlp.fc2",),
    },
    "v4": {
        "norm1": ("layernorm_before",),
        "attn.qkv": (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
        ),
        "attn.proj": ("attention.output.dense",),
        "norm2": ("layernorm_after",),
        "mlp.fc1": ("intermediate.dense",),
        "mlp.fc2": ("output.dense",),
    },
}

#: ``transformers`` classes :func:`from_hf` converts, with whether they carry DeiT's
#: distillation token and head.
SUPPORTED_ARCHITECTURES: dict[str, bool] = {
    "ViTForImageClassification": False,
    "DeiTForImageClassificationWithTeacher": True,
}

_ACTIVATIONS: dict[str, Any] = {
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
}
_LAYER_KEY = re.compile(r"^(?:layers|encoder\.layer)\.(\d+)\.(.+)$")
_TOP_KEYS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HEAD_KEYS = {
    "classifier": "head",
    "cls_classifier": "head",
    "distillation_classifier": "head_dist",
}


# --- the optional dependency -----------------------------------------------------------------
def import_transformers() -> types.ModuleType:
    """The ``transformers`` module (torchvision, when installed, through vitquant's checked
    import, so that its CUDA-build work-around applies).

    Raises:
        MissingDependencyError: transformers is not installed (``pip install 'vitquant[hf]'``).
    """
    from vitquant._optional import MissingDependencyError, import_torchvision

    if importlib.util.find_spec("transformers") is None:
        base = str(torch.__version__).split("+", 1)[0]
        raise MissingDependencyError(
            f"transformers is not installed: pip install 'vitquant[hf]' 'torch=={base}'"
        )
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()  # transformers imports it; vitquant's import defines missing ops
    return importlib.import_module("transformers")


# --- names -----------------------------------------------------------------------------------
def layer_layout(keys: set[str] | frozenset[str] | list[str]) -> str:
    """The layout (``"v5"`` or ``"v4"``) of a ``transformers`` ViT layer from its local keys.

    Raises:
        CheckpointError: neither layout's attention projections are there.
    """
    for name, table in LAYER_LAYOUTS.items():
        if all(f"{mod}.weight" in keys for mod in table["attn.qkv"]):
            return name
    raise CheckpointError(
        "not a transformers ViT/DeiT layer: no attention.q_proj/k_proj/v_proj (transformers 5) "
        "or attention.attention.query/key/value (transformers 4) weights"
    )


def _base_prefix(keys: set[str]) -> str:
    for prefix in ("vit.", "deit."):
        if f"{prefix}embeddings.cls_token" in keys:
            return prefix
    raise CheckpointError(
        "not a transformers ViT/DeiT state dict: no vit.embeddings.cls_token or "
        "deit.embeddings.cls_token"
    )


def _split_key(key: str, prefix: str, layout: str) -> tuple[str, int | None]:
    """vitquant name and qkv row block (0/1/2, None for a whole tensor) of a transformers key."""
    if key.startswith(prefix):
        rest = key[len(prefix) :]
        if rest in _TOP_KEYS:
            return _TOP_KEYS[rest], None
        m = _LAYER_KEY.match(rest)
        if m is not None:
            index, local = m.groups()
            for vit_mod, hf_mods in LAYER_LAYOUTS[layout].items():
                for part, hf_mod in enumerate(hf_mods):
                    if local.startswith(hf_mod + ".") and local.count(".") == hf_mod.count(".") + 1:
                        pname = local[len(hf_mod) + 1 :]
                        return f"blocks.{index}.{vit_mod}.{pname}", (
                            part if len(hf_mods) == 3 else None
                        )
    else:
        head, _, pname = key.partition(".")
        if head in _HEAD_KEYS and pname in ("weight", "bias"):
            return f"{_HEAD_KEYS[head]}.{pname}", None
    raise CheckpointError(
        f"transformers key {key!r} has no vitquant equivalent (only ViT/DeiT image "
        "classifiers without pooler or mask token convert)"
    )


def _layout_of(keys: set[str], prefix: str) -> str:
    local = {k.split(".", 3)[-1] for k in keys if re.match(rf"^{re.escape(prefix)}layers\.0\.", k)}
    local |= {
        k.split(".", 4)[-1]
        for k in keys
        if re.match(rf"^{re.escape(prefix)}encoder\.layer\.0\.", k)
    }
    return layer_layout(local)


def hf_to_vit_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Converts a ``transformers`` ViT/DeiT image-classifier state dict to vitquant's names.

    q/k/v projections are concatenated (in that order) into ``blocks.N.attn.qkv``.

    Raises:
        CheckpointError: a key without vitquant equivalent, or a layer whose q/k/v is incomplete.
    """
    keys = set(state)
    prefix = _base_prefix(keys)
    layout = _layout_of(keys, prefix)
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[int, Tensor]] = {}
    for key, value in state.items():
        name, part = _split_key(key, prefix, layout)
        if part is None:
            out[name] = value
        else:
            parts.setdefault(name, {})[part] = value
    for name, got in parts.items():
        if sorted(got) != [0, 1, 2]:
            raise CheckpointError(f"{name}: the transformers state has only {len(got)} of q/k/v")
        out[name] = torch.cat([got[0], got[1], got[2]], dim=0)
    return out


def vit_to_hf_state_dict(
    state: Mapping[str, Tensor], hf_keys: list[str] | set[str]
) -> dict[str, Tensor]:
    """The tensors for the ``hf_keys`` of a ``transformers`` model, from a vitquant state dict.

    Raises:
        CheckpointError: an ``hf_keys`` entry whose vitquant tensor is missing or has the wrong
            number of rows to split into q/k/v.
    """
    keys = set(hf_keys)
    prefix = _base_prefix(keys)
    layout = _layout_of(keys, prefix)
    out: dict[str, Tensor] = {}
    for key in hf_keys:
        name, part = _split_key(key, prefix, layout)
        if name not in state:
            raise CheckpointError(f"the vitquant model has no {name!r} for transformers' {key!r}")
        value = state[name]
        if part is not None:
            if value.shape[0] % 3:
                raise CheckpointError(f"{name}: {value.shape[0]} rows do not split into q/k/v")
            value = value.chunk(3, dim=0)[part]
        out[key] = value
    return out


# --- model conversion ------------------------------------------------------------------------
def _activation(act: Any) -> Any:
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise CheckpointError(
            f"hidden_act={act!r} has no vitquant equivalent; use one of {', '.join(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[act]


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _vit_kwargs(config: Any, distilled: bool) -> dict[str, Any]:
    """``VisionTransformer`` arguments for a transformers ViT/DeiT config."""
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None)
    if hidden % heads or (head_dim is not None and int(head_dim) * heads != hidden):
        raise CheckpointError(
            f"hidden_size {hidden} with {heads} heads (head_dim {head_dim}) has no vitquant "
            "equivalent: vitquant's attention needs heads * head_dim == hidden_size"
        )
    inter = int(config.intermediate_size)
    return dict(
        img_size=_pair(config.image_size),
        patch_size=_pair(config.patch_size),
        in_chans=int(config.num_channels),
        num_classes=int(config.num_labels),
        embed_dim=hidden,
        depth=int(config.num_hidden_layers),
        num_heads=heads,
        mlp_ratio=inter / hidden,
        qkv_bias=bool(getattr(config, "qkv_bias", True)),
        distilled=distilled,
        drop_rate=0.0,
        proj_drop_rate=float(config.hidden_dropout_prob),
        attn_drop_rate=float(config.attention_probs_dropout_prob),
        act_layer=_activation(config.hidden_act),
        norm_layer=functools.partial(nn.LayerNorm, eps=float(config.layer_norm_eps)),
    )


def from_hf(hf_model: nn.Module) -> VisionTransformer:
    """vitquant's :class:`VisionTransformer` with the weights of a ``transformers`` model.

    Args:
        hf_model: a ``ViTForImageClassification`` or ``DeiTForImageClassificationWithTeacher``
            (``transformers`` 4 or 5 layout).

    Returns:
        The model, in the train/eval mode, device and dtype of ``hf_model``; its logits equal
        ``hf_model(x).logits`` (up to float rounding).

    Raises:
        CheckpointError: another architecture, or a configuration vitquant cannot express
            (activation, head size).

    Example:
        >>> vit = from_hf(ViTForImageClassification(ViTConfig(hidden_size=32, ...)))
    """
    arch = type(hf_model).__name__
    if arch not in SUPPORTED_ARCHITECTURES or getattr(hf_model, "config", None) is None:
        raise CheckpointError(
            f"cannot convert a {arch}: from_hf converts {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    state = hf_model.state_dict()
    kwargs = _vit_kwargs(hf_model.config, SUPPORTED_ARCHITECTURES[arch])
    ref = next(iter(state.values()))
    vit = VisionTransformer(**kwargs).to(device=ref.device, dtype=ref.dtype)
    hidden = vit.blocks[0].mlp.fc1.out_features if len(vit.blocks) else 0
    if len(vit.blocks) and hidden != int(hf_model.config.intermediate_size):
        raise CheckpointError(
            f"intermediate_size {hf_model.config.intermediate_size} is not representable as an "
            f"MLP ratio of hidden_size {kwargs['embed_dim']}"
        )
    _load(vit, hf_to_vit_state_dict(state), arch)
    vit.default_cfg = {
        "architecture": f"hf:{arch}",
        "input_size": (kwargs["in_chans"], *kwargs["img_size"]),
        "num_classes": kwargs["num_classes"],
        "classifier": ("head", "head_dist") if vit.distilled else ("head",),
    }
    return vit.train(hf_model.training)


def _load(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"the weights of the {what} do not fit: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"the weights of the {what} do not fit: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def _check_vit(vit: VisionTransformer) -> tuple[float, str]:
    """LayerNorm eps and hidden_act of a vitquant ViT that transformers can express."""
    if not isinstance(vit, VisionTransformer):
        raise CheckpointError(f"to_hf converts a vitquant VisionTransformer, not {type(vit)}")
    if vit.global_pool != "token" or not isinstance(vit.fc_norm, nn.Identity):
        raise CheckpointError("transformers' ViT pools the class token: global_pool must be token")
    extra = [n for n in ("norm_pre",) if not isinstance(getattr(vit, n), nn.Identity)]
    for i, blk in enumerate(vit.blocks):
        if not (isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)):
            extra.append(f"blocks.{i} LayerScale")
    if extra:
        raise CheckpointError(f"transformers' ViT has no equivalent of {', '.join(extra)}")
    norms = [m for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    eps = {float(m.eps) for m in norms}
    if len(eps) > 1:
        raise CheckpointError(f"the LayerNorms use several eps {sorted(eps)}; transformers has one")
    acts = {
        (type(b.mlp.act).__name__, getattr(b.mlp.act, "approximate", "none")) for b in vit.blocks
    }
    names = {
        ("GELU", "none"): "gelu",
        ("GELU", "tanh"): "gelu_pytorch_tanh",
        ("ReLU", "none"): "relu",
    }
    if len(acts) > 1 or (acts and next(iter(acts)) not in names):
        raise CheckpointError(f"MLP activation {acts} has no transformers equivalent")
    return (eps.pop() if eps else 1e-6), names[next(iter(acts))] if acts else "gelu"


def to_hf(vit: VisionTransformer, config: Any | None = None, **config_kwargs: Any) -> nn.Module:
    """A ``transformers`` model with the weights of vitquant's :class:`VisionTransformer`.

    Args:
        vit: a class-token ViT (``ViTForImageClassification``) or a distilled DeiT
            (``DeiTForImageClassificationWithTeacher``), without LayerScale.
        config: a ``ViTConfig`` / ``DeiTConfig`` to use; it must describe ``vit`` (checked).
        **config_kwargs: other config fields for the built config (``id2label``, ...).

    Returns:
        The ``transformers`` model, in ``vit``'s train/eval mode, device and dtype, whose logits
        equal ``vit(x)``.

    Raises:
        CheckpointError: ``config`` does not match ``vit`` (the field and both values are named),
            or ``vit`` has parts transformers cannot express (LayerScale, average pooling).
        MissingDependencyError: transformers is not installed.
    """
    eps, act = _check_vit(vit)
    tf = import_transformers()
    cfg_cls = tf.DeiTConfig if vit.distilled else tf.ViTConfig
    model_cls = (
        tf.DeiTForImageClassificationWithTeacher if vit.distilled else tf.ViTForImageClassification
    )
    blk = vit.blocks[0] if len(vit.blocks) else None
    want: dict[str, Any] = dict(
        hidden_size=vit.embed_dim,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=blk.attn.num_heads if blk is not None else 1,
        intermediate_size=blk.mlp.fc1.out_features if blk is not None else 4 * vit.embed_dim,
        image_size=vit.patch_embed.img_size[0],
        patch_size=vit.patch_embed.patch_size[0],
        num_channels=vit.patch_embed.proj.in_channels,
        qkv_bias=blk.attn.qkv.bias is not None if blk is not None else True,
        layer_norm_eps=eps,
        hidden_act=act,
        num_labels=vit.num_classes,
    )
    if vit.patch_embed.img_size[0] != vit.patch_embed.img_size[1]:
        want["image_size"] = list(vit.patch_embed.img_size)
    if vit.patch_embed.patch_size[0] != vit.patch_embed.patch_size[1]:
        want["patch_size"] = list(vit.patch_embed.patch_size)
    if config is None:
        config = cfg_cls(**{**want, **config_kwargs})
    else:
        if config_kwargs:
            raise ConfigError("give either config or config fields, not both")
        if not isinstance(config, cfg_cls):
            raise CheckpointError(
                f"a {'distilled ' if vit.distilled else ''}ViT needs a "
                f"{cfg_cls.__name__}, not a {type(config).__name__}"
            )
        for field, value in want.items():
            got = getattr(config, field, None)
            same = (
                _pair(got) == _pair(value)
                if field in ("image_size", "patch_size")
                else (
                    got == value
                    if not isinstance(value, float)
                    else abs(float(got) - value) < 1e-12
                )
            )
            if not same:
                raise CheckpointError(
                    f"config does not match the model: {field} is {got!r} in the config, "
                    f"{value!r} in the model"
                )
    hf = model_cls(config)
    ref = next(iter(vit.state_dict().values()))
    hf = hf.to(device=ref.device, dtype=ref.dtype)
    keys = list(hf.state_dict())
    _load(hf, vit_to_hf_state_dict(vit.state_dict(), keys), model_cls.__name__)
    return hf.train(vit.training)


# --- folders ---------------------------------------------------------------------------------
def load_hf_folder(path: str | Path, **kwargs: Any) -> nn.Module:
    """Loads a ``transformers`` ViT/DeiT from a local ``save_pretrained`` folder (no hub).

    Args:
        path: the folder (``config.json`` and ``model.safetensors``).
        **kwargs: passed to ``from_pretrained`` (e.g. ``dtype``).

    Returns:
        The ``transformers`` model of the folder's ``architectures`` entry, in eval mode.

    Raises:
        CheckpointError: no such folder, no readable ``config.json``, or an architecture other
            than :data:`SUPPORTED_ARCHITECTURES`.
        MissingDependencyError: transformers is not installed.
    """
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{folder} is not a transformers save_pretrained folder (no config.json)"
        )
    try:
        archs = json.loads(cfg_file.read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {cfg_file}: {exc}") from exc
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(
            f"{folder}: architecture {archs or 'unknown'} is not one of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tf = import_transformers()
    try:
        model = getattr(tf, arch).from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load {folder}: {exc}") from exc
    return model.eval()


def vit_from_hf_folder(path: str | Path) -> VisionTransformer:
    """:func:`load_hf_folder` then :func:`from_hf`: a vitquant ViT from a ``transformers``
    folder."""
    return from_hf(load_hf_folder(path))

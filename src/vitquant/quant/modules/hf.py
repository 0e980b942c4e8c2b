"""Quantizable Hugging Face ``transformers`` ViT / DeiT layers.

``prepare`` cannot quantize a ``transformers`` ``ViTLayer`` / ``DeiTLayer`` as it stands: its
attention computes q·kᵀ, the softmax and attn·v inside a function (eager, SDPA or flash
attention) and its residual adds are ``+`` in ``forward``, so there is no module to hold the
FasterTransformer ViT example's ``matmul_{q,k,v,a}_input``, ``softmax_input`` and
``add{1,2}_{residual,local}_input`` quantizers. :func:`swap_hf_layers` turns each such layer, in
place, into a :class:`QuantHFLayer`: the same object (its class becomes a subclass of its own
class, so ``isinstance`` checks, ``output_hidden_states`` and gradient checkpointing keep
working) whose only child, ``block``, is a vitquant :class:`~vitquant.models.vit.Block` computing
what the layer computed:

* ``block.norm1`` / ``block.norm2`` are the layer's ``layernorm_before`` / ``layernorm_after``
  (the same modules), ``block.attn.proj``, ``block.mlp.fc1`` / ``fc2`` its output and MLP
  projections (the same modules);
* ``block.attn.qkv`` is one Linear whose rows are the q, k and v projections (as in timm and in
  FasterTransformer's fused-QKV kernels, so q, k and v share one input quantizer, one weight
  quantizer and one after-GEMM quantizer: FasterTransformer's ``fuse_qkv`` of ft2);
* q·kᵀ, the softmax, attn·v and the residual adds are ``block``'s op modules.

``prepare`` then quantizes ``block`` exactly as a vitquant or timm ViT block: the same points,
SmoothQuant / RepQ-ViT folding, block reconstruction, and :func:`vitquant.runtime.lower`'s fused
integer block. The state dict keeps the ``transformers`` names (``layernorm_before.weight``,
``attention.q_proj.weight`` ...): a state-dict hook splits the fused rows back into q, k and v
and a load pre-hook joins them, so ``save_pretrained`` / ``load_state_dict`` of float weights
work as before. The name mapping is :data:`vitquant.models.hf.LAYER_LAYOUTS` (``transformers`` 5
and 4 layouts). ``transformers`` itself is never imported here: layers are recognised by class
name and module (``transformers.*``).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import CheckpointError, ConfigError
from vitquant.models.hf import LAYER_LAYOUTS, layer_layout
from vitquant.models.vit import Block

__all__ = ["HF_LAYER_CLASSES", "QuantHFLayer", "is_hf_layer", "hf_layer_block", "swap_hf_layers"]

#: ``transformers`` layer classes that :func:`swap_hf_layers` turns into :class:`QuantHFLayer`.
HF_LAYER_CLASSES = frozenset({"ViTLayer", "DeiTLayer"})

_CLASSES: dict[type, type] = {}
_PARAMS = ("weight", "bias")


def is_hf_layer(m: nn.Module) -> bool:
    """True for a (not yet swapped) ``transformers`` ViT/DeiT encoder layer."""
    t = type(m)
    return (
        t.__name__ in HF_LAYER_CLASSES
        and t.__module__.startswith("transformers.")
        and all(hasattr(m, a) for a in ("layernorm_before", "layernorm_after", "attention"))
    )


class QuantHFLayer:
    """Mixin of the swapped ``transformers`` layers: ``forward`` runs ``self.block``.

    The swapped layer's class is ``Quant<Layer>(QuantHFLayer, <Layer>)``. ``forward`` takes the
    arguments of the ``transformers`` layer (hidden states, then the attention / head mask,
    which must be None: ViT/DeiT classification passes none) and returns what it returned (a
    tensor in ``transformers`` 5, a tuple in 4).
    """

    block: nn.Module
    _vitquant_layout: str
    _vitquant_tuple: bool

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        mask = args[0] if args else kwargs.get("attention_mask", kwargs.get("head_mask"))
        if mask is not None:
            raise ConfigError(
                "a quantized transformers ViT layer takes no attention or head mask "
                "(vitquant's ViT attention has none)"
            )
        out = self.block(hidden_states)
        if not self._vitquant_tuple:
            return out
        want_attn = bool(args[1] if len(args) > 1 else kwargs.get("output_attentions", False))
        return (out, None) if want_attn else (out,)


def _quant_class(cls: type) -> type:
    q = _CLASSES.get(cls)
    if q is None:
        q = type(f"Quant{cls.__name__}", (QuantHFLayer, cls), {"__module__": __name__})
        _CLASSES[cls] = q
    return q


def _returns_tuple(cls: type) -> bool:
    """transformers 4 layers take ``output_attentions`` and return a tuple."""
    try:
        return "output_attentions" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def _is_gelu(act: Any) -> bool:
    """transformers' exact ``GELUActivation`` (``hidden_act="gelu"``)."""
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is (
        torch.nn.functional.gelu
    )


def _dropout_p(m: Any) -> float:
    if isinstance(m, nn.Dropout):
        return float(m.p)
    return float(m) if isinstance(m, (int, float)) else 0.0


def hf_layer_block(layer: nn.Module, layout: str) -> tuple[Block | None, str]:
    """A vitquant :class:`Block` computing what ``layer`` computes, holding its modules (the
    q/k/v projections joined into one ``qkv``), or ``(None, reason)``."""
    table = LAYER_LAYOUTS[layout]
    try:
        mods = {k: [layer.get_submodule(p) for p in v] for k, v in table.items()}
    except AttributeError as exc:
        return None, str(exc)
    ln1, ln2 = mods["norm1"][0], mods["norm2"][0]
    q, k, v = mods["attn.qkv"]
    linears = [q, k, v, mods["attn.proj"][0], mods["mlp.fc1"][0], mods["mlp.fc2"][0]]
    if any(type(m) is not nn.Linear for m in linears) or any(
        type(m) is not nn.LayerNorm for m in (ln1, ln2)
    ):
        return None, "its projections are not plain nn.Linear / nn.LayerNorm"
    dim = int(ln1.normalized_shape[0])
    if (
        any(m.weight.shape != (dim, dim) for m in (q, k, v))
        or len({m.bias is None for m in (q, k, v)}) != 1
    ):
        return None, "q/k/v projections are not square with one bias setting"
    if layout == "v5":
        attn, act, p_hidden = layer.attention, layer.mlp.activation_fn, _dropout_p(layer.dropout)
        heads, p_attn = int(attn.num_attention_heads), _dropout_p(attn.attention_dropout)
    else:
        attn = layer.attention.attention
        act, p_hidden = layer.intermediate.intermediate_act_fn, _dropout_p(layer.output.dropout)
        heads = int(attn.num_attention_heads)
        p_attn = _dropout_p(getattr(attn, "dropout", getattr(attn, "dropout_prob", 0.0)))
    if dim % heads:
        return None, f"{dim} channels do not split into {heads} heads"
    if not isinstance(act, nn.Module):
        return None, f"activation {act!r} is not a module"
    block = Block(dim, heads, 1.0, q.bias is not None, proj_drop=p_hidden, attn_drop=p_attn)
    block.norm1, block.norm2 = ln1, ln2
    qkv = nn.Linear(dim, 3 * dim, bias=q.bias is not None, device=q.weight.device)
    qkv = qkv.to(q.weight.dtype)
    with torch.no_grad():
        qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        if qkv.bias is not None:
            qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    qkv.weight.requires_grad_(q.weight.requires_grad)
    if qkv.bias is not None:
        qkv.bias.requires_grad_(q.bias.requires_grad)
    block.attn.qkv = qkv
    block.attn.proj = mods["attn.proj"][0]
    block.attn.scale = float(getattr(attn, "scaling", (dim // heads) ** -0.5))
    block.mlp.fc1, block.mlp.fc2 = mods["mlp.fc1"][0], mods["mlp.fc2"][0]
    block.mlp.act = nn.GELU() if _is_gelu(act) else act
    block.mlp.drop1 = nn.Dropout(0.0)  # transformers has no dropout after the activation
    return block.train(layer.training), ""


# --- state-dict names ------------------------------------------------------------------------
def _to_hf_names(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict post hook: ``block.attn.qkv.weight`` -> ``attention.q_proj.weight`` ..."""
    for vit_mod, hf_mods in LAYER_LAYOUTS[module._vitquant_layout].items():  # type: ignore[index]
        for pname in _PARAMS:
            key = f"{prefix}block.{vit_mod}.{pname}"
            if key not in state:
                continue
            value = state.pop(key)
            if len(hf_mods) == 1:
                state[f"{prefix}{hf_mods[0]}.{pname}"] = value
                continue
            for hf_mod, chunk in zip(hf_mods, value.chunk(3, dim=0)):
                state[f"{prefix}{hf_mod}.{pname}"] = chunk.clone()  # no shared storage


def _from_hf_names(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre hook: the inverse of :func:`_to_hf_names`."""
    for vit_mod, hf_mods in LAYER_LAYOUTS[module._vitquant_layout].items():  # type: ignore[index]
        for pname in _PARAMS:
            keys = [f"{prefix}{hf_mod}.{pname}" for hf_mod in hf_mods]
            if not all(k in state for k in keys):
                continue
            values = [state.pop(k) for k in keys]
            joined = values[0] if len(values) == 1 else torch.cat(values, dim=0)
            state[f"{prefix}block.{vit_mod}.{pname}"] = joined


# --- the swap --------------------------------------------------------------------------------
def swap_hf_layers(model: nn.Module) -> int:
    """Turns every ``transformers`` ViT/DeiT layer of ``model`` into a :class:`QuantHFLayer`,
    in place (state-dict keys unchanged); returns how many. Layers that cannot be expressed
    (other projections, masks of another kind) stay as they are, with a warning."""
    count = 0
    for fqn, m in list(model.named_modules()):
        if not is_hf_layer(m):
            continue
        before = m.state_dict()
        try:
            layout = layer_layout(set(before))
        except CheckpointError as exc:
            block, why = None, str(exc)
        else:
            block, why = hf_layer_block(m, layout)
        if block is None:
            warnings.warn(
                f"prepare: {fqn} ({type(m).__name__}) not swapped: {why}; its attention ops "
                "stay float",
                stacklevel=3,
            )
            continue
        cls = type(m)
        for name in list(m._modules):
            delattr(m, name)
        m.__class__ = _quant_class(cls)
        m.block = block
        m._vitquant_layout = layout
        m._vitquant_tuple = _returns_tuple(cls)
        m.register_state_dict_post_hook(_to_hf_names)
        m.register_load_state_dict_pre_hook(_from_hf_names)
        if set(m.state_dict()) != set(before):  # pragma: no cover - a bug in the mapping
            raise RuntimeError(f"prepare: swapping {fqn} changed its state-dict keys")
        count += 1
    return count

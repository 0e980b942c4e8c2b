"""LayerNorm reparameterisation of RepQ-ViT (Li et al., 2023, arXiv 2212.08254, section 3.2).

Post-LayerNorm activations vary wildly across channels, so a per-tensor quantizer wastes most of
its levels, while integer kernels want one scale per tensor. RepQ-ViT calibrates the
post-LayerNorm quantizer per channel (asymmetric scale ``s_c`` and zero point ``z_c``), then folds
the channel variation into the model so that a per-tensor quantizer reproduces the per-channel
one exactly:

* per-tensor parameters ``s~ = mean(s)``, ``z~ = round(mean(z))``; ratios ``r1 = s / s~`` and
  integer shifts ``r2 = z - z~``;
* LayerNorm affine: ``gamma' = gamma / r1``, ``beta' = (beta + s * r2) / r1`` so its output
  becomes ``X' = (X + s * r2) / r1``, and ``round(X'_c / s~) + z~ = round(X_c / s_c) + z_c``;
* next Linear: ``W' = W diag(r1)``, ``b' = b - W (s * r2)``, so ``W' X' + b' = W X + b``.

In float the model computes the same function (up to rounding); quantized, the per-tensor
quantizer on ``X'`` gives the per-channel result on ``X``. Pairs are found structurally: in a
pre-norm block, ``norm1 -> attn.qkv`` (or ``self_attn``'s packed input projection) and
``norm2 -> mlp.fc1`` (or ``linear1``).

The structure search is shared with other methods that move a per-input-channel factor ``s``
through the model (SmoothQuant's migration, ``vitquant.methods.ptq.smoothquant``):
:func:`channel_pairs` lists those pairs and the activation-fed ``mlp.fc2`` (``linear2``), and
:func:`apply_channel_scale` divides the layer's input by ``s`` and multiplies its weight columns
by ``s``: folded into the LayerNorm (``gamma / s``, ``beta / s``) for a LayerNorm pair, as the
layer's explicit ``smooth_scale`` (:class:`~vitquant.quant.modules.QuantLinear`) after an
activation, which is not homogeneous (``GELU(x / s) != GELU(x) / s``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.quant.granularity import PerChannel, PerTensor
from vitquant.quant.modules import (
    QuantLinear,
    QuantMultiheadAttention,
    QuantTransformerEncoderLayer,
)
from vitquant.quant.modules.linear import SMOOTH_BUFFER
from vitquant.quant.modules.torchvision import is_torchvision_encoder_block
from vitquant.quant.quantizers import Quantizer
from vitquant.quant.quantizers.base import gran_kind

__all__ = [
    "ReparamPair",
    "ChannelPair",
    "channel_pairs",
    "apply_channel_scale",
    "find_pairs",
    "prepare_reparam",
    "apply_reparam",
]

#: Kinds of :class:`ChannelPair`.
PAIR_KINDS = ("ln", "act")


@dataclass
class ReparamPair:
    """A LayerNorm, the layer reading its output, and the quantizer of that output."""

    name: str
    norm: nn.LayerNorm
    consumer: nn.Module
    weight_name: str
    bias_name: str
    quantizer: Quantizer


@dataclass
class ChannelPair:
    """A layer whose input channels a per-channel factor can be moved through.

    Attributes:
        name: the consumer's module name (``blocks.0.attn.qkv``).
        kind: ``"ln"``: the input is the output of ``producer``, a LayerNorm that feeds only
            this layer (pre-norm blocks), so a factor folds into its affine parameters;
            ``"act"``: the input is an activation's output (``mlp.fc2``/``linear2``), so a factor
            can only be the layer's own ``smooth_scale`` (``consumer`` is a ``QuantLinear``).
        producer_name: the LayerNorm's (or the activation's) name.
        producer: the LayerNorm (``"ln"``) or the activation module (None for a function).
        consumer: the ``QuantLinear`` or ``QuantMultiheadAttention`` (packed input projection).
        weight_name, bias_name: the consumer's weight and bias parameter names.
        input_slot: the consumer's input quantizer slot.
    """

    name: str
    kind: str
    producer_name: str
    producer: nn.Module | None
    consumer: nn.Module
    weight_name: str
    bias_name: str
    input_slot: str


def _consumer(block: nn.Module, first: str, second: str) -> tuple[nn.Module, str, str, str] | None:
    parent = getattr(block, first, None)
    if parent is None:
        return None
    if isinstance(parent, QuantMultiheadAttention):
        return parent, "in_proj_weight", "in_proj_bias", "in_proj_input_quantizer"
    if getattr(parent, "gate", None) is not None:
        return None  # the LayerNorm output also feeds a gate; not foldable into one layer
    layer = getattr(parent, second, None) if second else parent
    if isinstance(layer, QuantLinear):
        return layer, "weight", "bias", "input_quantizer"
    return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def channel_pairs(model: nn.Module, kinds: tuple[str, ...] = PAIR_KINDS) -> list[ChannelPair]:
    """The (producer, consumer) pairs of ``kinds`` in the prepared model's blocks, in order.

    ``"ln"``: ``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1`` in pre-norm ViT blocks
    (``self_attn``/``linear1`` in a ``norm_first`` ``nn.TransformerEncoderLayer``); ``"act"``:
    ``mlp.act -> mlp.fc2`` (``activation -> linear2``); torchvision ``EncoderBlock``:
    ``ln_1 -> self_attention``, ``ln_2 -> mlp.0``, ``mlp.1 -> mlp.3``. Quantizers are not looked at.
    """
    bad = [k for k in kinds if k not in PAIR_KINDS]
    if bad:
        raise ConfigError(f"unknown pair kind(s) {bad}; use {', '.join(PAIR_KINDS)}")
    pairs: list[ChannelPair] = []
    for name, block in model.named_modules():
        if isinstance(block, QuantTransformerEncoderLayer):
            # post-norm: the LayerNorm output also feeds the residual
            specs = (
                [("norm1", "self_attn", ""), ("norm2", "linear1", "")] if block.norm_first else []
            )
            act = ("", "linear2", "activation")
        elif is_torchvision_encoder_block(block):  # mlp: Linear, GELU, Dropout, Linear, Dropout
            specs = [("ln_1", "self_attention", ""), ("ln_2", "mlp", "0")]
            act = ("mlp", "3", "1")
        elif all(hasattr(block, a) for a in ("norm1", "attn", "norm2", "mlp", "add1", "add2")):
            specs = [("norm1", "attn", "qkv"), ("norm2", "mlp", "fc1")]
            act = ("mlp", "fc2", "act")
        else:
            continue
        if "ln" in kinds:
            for norm_name, first, second in specs:
                norm = getattr(block, norm_name, None)
                found = _consumer(block, first, second)
                if not isinstance(norm, nn.LayerNorm) or found is None:
                    continue
                layer, wname, bname, qslot = found
                pairs.append(
                    ChannelPair(
                        _join(name, first, second), "ln", _join(name, norm_name), norm,
                        layer, wname, bname, qslot,
                    )
                )  # fmt: skip
        if "act" in kinds:
            first, second, act_attr = act
            parent = getattr(block, first, None) if first else block
            layer = getattr(parent, second, None)
            if isinstance(layer, QuantLinear):
                producer = getattr(parent, act_attr, None)
                pairs.append(
                    ChannelPair(
                        _join(name, first, second), "act", _join(name, first, act_attr),
                        producer if isinstance(producer, nn.Module) else None,
                        layer, "weight", "bias", "input_quantizer",
                    )
                )  # fmt: skip
    return pairs


@torch.no_grad()
def apply_channel_scale(pair: ChannelPair, s: Tensor) -> None:
    """Divides the consumer's input by ``s`` (``[in_features]``, positive) and multiplies its
    weight columns by ``s``: the float function is unchanged up to rounding.

    ``"ln"`` pairs fold ``1 / s`` into the LayerNorm (``gamma / s``, ``beta / s``; it must have
    a weight); ``"act"`` pairs multiply the consumer's ``smooth_scale`` by ``s`` (set it when
    absent). The consumer's bias is unchanged.

    Raises:
        ConfigError: a factor of the wrong shape, not finite and positive, or a LayerNorm
            without affine weight.
    """
    w = getattr(pair.consumer, pair.weight_name)
    s = s.detach().to(device=w.device, dtype=torch.float32).reshape(-1)
    if s.numel() != w.shape[1]:
        raise ConfigError(f"{pair.name}: {s.numel()} factors for {w.shape[1]} input channels")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ConfigError(f"{pair.name}: channel factors must be finite and positive")
    if pair.kind == "ln":
        norm = pair.producer
        assert isinstance(norm, nn.LayerNorm)
        if norm.weight is None:
            raise ConfigError(f"{pair.producer_name} has no affine weight to fold a factor into")
        norm.weight.copy_((norm.weight.float() / s).to(norm.weight.dtype))
        if norm.bias is not None:
            norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))
    else:
        old = pair.consumer._buffers.get(SMOOTH_BUFFER)
        new = s if old is None else old.float() * s
        pair.consumer.register_buffer(SMOOTH_BUFFER, new.to(w.dtype).clone())
    w.copy_((w.float() * s.unsqueeze(0)).to(w.dtype))


def find_pairs(model: nn.Module) -> list[ReparamPair]:
    """Foldable (LayerNorm, next layer) pairs whose post-LayerNorm quantizer exists."""
    pairs: list[ReparamPair] = []
    for p in channel_pairs(model, ("ln",)):
        q = getattr(p.consumer, p.input_slot, None)
        if not isinstance(q, Quantizer) or q.kind != "uniform":
            continue
        norm = p.producer
        assert isinstance(norm, nn.LayerNorm)
        if norm.weight is None or norm.bias is None or getattr(p.consumer, p.bias_name) is None:
            warnings.warn(
                f"ln_reparam: {p.producer_name} has no affine bias or its next layer has no "
                "bias; left per tensor",
                stacklevel=2,
            )
            continue
        pairs.append(ReparamPair(p.producer_name, norm, p.consumer, p.weight_name, p.bias_name, q))
    return pairs


def prepare_reparam(model: nn.Module) -> list[ReparamPair]:
    """Makes each post-LayerNorm quantizer per-channel asymmetric for calibration."""
    pairs = find_pairs(model)
    for p in pairs:
        p.quantizer.granularity = PerChannel(axis=-1)
        p.quantizer.symmetric = False
        p.quantizer.signed = False
        p.quantizer.reset()
    return pairs


@torch.no_grad()
def apply_reparam(pairs: list[ReparamPair]) -> int:
    """Folds the calibrated per-channel ranges into the LayerNorms and next layers.

    Each pair's quantizer must be calibrated per channel; afterwards it is per tensor. Pairs whose
    quantizer saw no data are skipped. Returns the number of folded pairs.
    """
    done = 0
    for p in pairs:
        q = p.quantizer
        if not q.is_calibrated or gran_kind(q.granularity) != "channel":
            continue
        s: Tensor = q.scale.float()
        z: Tensor = q.zero_point.float()
        s_t = s.mean()
        z_t = torch.round(z.mean())
        r1 = s / s_t
        r2 = z - z_t
        gamma, beta = p.norm.weight, p.norm.bias
        new_beta = (beta.float() + s * r2) / r1
        gamma.copy_((gamma.float() / r1).to(gamma.dtype))
        beta.copy_(new_beta.to(beta.dtype))
        w = getattr(p.consumer, p.weight_name)
        b = getattr(p.consumer, p.bias_name)
        shift = w.float() @ (s * r2)
        b.copy_((b.float() - shift).to(b.dtype))
        w.copy_((w.float() * r1.unsqueeze(0)).to(w.dtype))
        q.set_qparams(s_t.reshape(()), z_t.reshape(()), granularity=PerTensor())
        done += 1
    return done

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
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitquant.quant.granularity import PerChannel, PerTensor
from vitquant.quant.modules import (
    QuantLinear,
    QuantMultiheadAttention,
    QuantTransformerEncoderLayer,
)
from vitquant.quant.quantizers import Quantizer
from vitquant.quant.quantizers.base import gran_kind

__all__ = ["ReparamPair", "find_pairs", "prepare_reparam", "apply_reparam"]


@dataclass
class ReparamPair:
    """A LayerNorm, the layer reading its output, and the quantizer of that output."""

    name: str
    norm: nn.LayerNorm
    consumer: nn.Module
    weight_name: str
    bias_name: str
    quantizer: Quantizer


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


def find_pairs(model: nn.Module) -> list[ReparamPair]:
    """Foldable (LayerNorm, next layer) pairs whose post-LayerNorm quantizer exists."""
    pairs: list[ReparamPair] = []
    for name, block in model.named_modules():
        if isinstance(block, QuantTransformerEncoderLayer):
            if not block.norm_first:
                continue  # post-norm: the LayerNorm output also feeds the residual
            specs = [("norm1", "self_attn", ""), ("norm2", "linear1", "")]
        elif all(hasattr(block, a) for a in ("norm1", "attn", "norm2", "mlp", "add1", "add2")):
            specs = [("norm1", "attn", "qkv"), ("norm2", "mlp", "fc1")]
        else:
            continue
        for norm_name, first, second in specs:
            norm = getattr(block, norm_name, None)
            found = _consumer(block, first, second)
            if not isinstance(norm, nn.LayerNorm) or found is None:
                continue
            layer, wname, bname, qslot = found
            q = getattr(layer, qslot, None)
            if not isinstance(q, Quantizer) or q.kind != "uniform":
                continue
            if norm.weight is None or norm.bias is None or getattr(layer, bname) is None:
                warnings.warn(
                    f"ln_reparam: {name}.{norm_name} has no affine bias or its next layer has no "
                    "bias; left per tensor",
                    stacklevel=2,
                )
                continue
            pairs.append(ReparamPair(f"{name}.{norm_name}", norm, layer, wname, bname, q))
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

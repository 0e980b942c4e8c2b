"""What an outlier injection did (:class:`Injection`) and the machinery the injections of
:mod:`vitquant.models.outliers` share: the checks of the model and of the arguments, the masks of
the injected entries, and the short KL fine-tune towards the original logits with those entries
frozen, followed by the measurement of the outlier ratio and of the agreement with the original.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.models.activation_stats import _logits, outlier_stats, output_agreement

__all__ = ["Injection"]


@dataclass
class Injection:
    """What one injection did.

    Attributes:
        kind: ``"ln"``, ``"gelu"`` or ``"tokens"``.
        layers: modules whose first input carries the outliers (``blocks.0.attn.qkv``; the
            residual adds ``blocks.i.add1``/``add2`` for tokens).
        channels: the outlier channels of those inputs.
        value: the LayerNorm factor, the GELU shift ``B``, or the token magnitude.
        tokens: token indices (tokens only).
        ratio: the largest outlier ratio (:class:`ChannelStats`) of ``layers[0]`` after injection.
        agreement: :func:`output_agreement` with the original model after injection (after the
            fine-tune, if any), and ``before_finetune`` (the same before it).
        masks: ``{parameter name: bool mask}`` of the entries that carry the outlier (frozen by
            later fine-tunes); not part of :meth:`to_dict`.
    """

    kind: str
    layers: list[str]
    channels: list[int]
    value: float
    tokens: list[int] = field(default_factory=list)
    ratio: float | None = None
    agreement: dict[str, float] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON), without the masks."""
        d = asdict(self)
        d.pop("masks")
        return d


def _check_float_vit(model: nn.Module) -> nn.Sequential:
    # a prepared model holds vitquant.quant modules (recognised without importing that layer)
    if any(type(m).__module__.startswith("vitquant.quant.") for m in model.modules()):
        raise ConfigError("inject outliers into the float model, before prepare()")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks):
        raise ConfigError(f"{type(model).__name__} has no transformer blocks (model.blocks)")
    for b in blocks:
        if not all(hasattr(b, a) for a in ("norm1", "attn", "norm2", "mlp")):
            raise ConfigError("the blocks are not pre-norm ViT blocks (norm1, attn, norm2, mlp)")
    return blocks


def _block_index(blocks: nn.Sequential, block: int) -> int:
    if not -len(blocks) <= block < len(blocks):
        raise ConfigError(f"block {block} out of range: the model has {len(blocks)} blocks")
    return block % len(blocks)


def _pick(n: int, k: int, seed: int) -> list[int]:
    """``k`` distinct indices below ``n``, chosen by ``seed``."""
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def _check_channels(channels: Sequence[int], n: int, what: str) -> list[int]:
    out = [int(c) for c in channels]
    if not out or any(not 0 <= c < n for c in out) or len(set(out)) != len(out):
        raise ConfigError(f"{what} {list(channels)} must be distinct indices in [0, {n})")
    return out


def _mask(p: Tensor, index: Any) -> Tensor:
    m = torch.zeros_like(p, dtype=torch.bool)
    m[index] = True
    return m


def _kl_finetune(
    model: nn.Module,
    reference: nn.Module,
    inputs: list[Tensor],
    steps: int,
    lr: float,
    masks: dict[str, Tensor],
) -> None:
    """A short fine-tune of ``model`` towards ``reference``'s logits (KL), ``masks`` frozen."""
    params = dict(model.named_parameters())
    for name in masks:
        if name not in params:
            raise ConfigError(f"no parameter {name!r} to keep")
    trainable = [p for p in params.values() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=lr)
    was_training = model.training
    model.eval()  # no dropout: the model's function, not a training one
    reference.eval()
    with torch.no_grad():
        targets = [F.log_softmax(_logits(reference, x).float(), -1) for x in inputs]
    try:
        for step in range(steps):
            x, t = inputs[step % len(inputs)], targets[step % len(inputs)]
            log_p = F.log_softmax(_logits(model, x).float(), -1)
            loss = F.kl_div(log_p, t, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=False)
            loss.backward()
            for name, m in masks.items():
                g = params[name].grad
                if g is not None:
                    g[m] = 0.0
            opt.step()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _all_masks(keep: Sequence[Injection]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for inj in keep:
        for name, m in inj.masks.items():
            out[name] = out[name] | m if name in out else m
    return out


def _check_tune(steps: int, lr: float) -> None:
    if int(steps) < 0 or not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"steps={steps} must be >= 0 and lr={lr} > 0")


def _finish(
    model: nn.Module,
    original: nn.Module,
    inputs: list[Tensor],
    inj: Injection,
    steps: int,
    lr: float,
    keep: Sequence[Injection],
    top_k: int,
    percentile: float,
) -> None:
    """Fine-tunes (``steps > 0``), then measures ``inj.agreement`` and ``inj.ratio``."""
    before = output_agreement(original, model, inputs)
    after = before
    if steps:
        state = copy.deepcopy(model.state_dict())
        _kl_finetune(model, original, inputs, steps, lr, _all_masks([*keep, inj]))
        after = output_agreement(original, model, inputs)
        if after["rel_error"] > before["rel_error"]:  # keep the better of the two
            model.load_state_dict(state)
            after = before
    inj.agreement = {**after, "before_finetune": before}
    stats = outlier_stats(model, inputs, inj.layers[:1], top_k=top_k, percentile=percentile)
    inj.ratio = stats[inj.layers[0]].ratio

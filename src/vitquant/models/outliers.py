"""Function-preserving outlier injection into a float :class:`~vitquant.models.VisionTransformer`,
for test models of outlier-aware PTQ.

Real pretrained ViTs have a few activation channels far outside the rest; small models trained
from scratch have none, so PTQ tuned on them does not transfer. These functions build test models
with realistic outliers out of any vitquant ViT (parameters only, the structure and the state-dict
names stay):

* :func:`inject_ln_outliers`: LayerNorm channels scaled by ``factor`` with the consumer Linear's
  input columns divided by it (post-LayerNorm inputs that vary by channel). Exact.
* :func:`inject_gelu_outliers`: one MLP hidden channel (``fc2``'s input) made huge and nearly
  constant ("massive activation"): its pre-activation is replaced by its least-squares linear fit
  ``a*x + b`` plus a shift ``B``, so GELU works in its linear regime (``GELU(t) = t`` to 1e-14 for
  ``t > 8``) and ``fc2.bias`` takes back ``fc2.weight[:, j] * B``. The only change of the function
  is the fit's residual ``GELU(x) - a*x - b`` on one of the hidden channels, chosen where it is
  smallest; an optional short fine-tune (KL to the original logits) removes most of it.
* :func:`inject_massive_tokens`: huge values in a few residual-stream dimensions on a few tokens
  (Sun et al., "Massive activations in large language models", 2024, also in ViTs), through
  ``pos_embed``. LayerNorm normalises each token over its channels, so a huge value in one channel
  makes that token's LayerNorm outputs nearly constant: this cannot be exact. The default token is
  one the head does not read (the first patch token with class-token pooling); a short fine-tune
  with a KL term to the original logits restores the function, the injected entries frozen.
* :func:`inject_outliers`: several kinds in sequence, each later fine-tune keeping the earlier
  outliers.

The outliers are measured with :func:`vitquant.models.activation_stats.outlier_stats`.

The :class:`Injection` record, the argument checks and the shared KL fine-tune live in
:mod:`vitquant.models.injection` (re-exported here); the statistics they use are in
:mod:`vitquant.models.activation_stats`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.models.activation_stats import (
    ChannelHistogram,
    _device,
    _forward_all,
    _inputs,
    outlier_stats,
)
from vitquant.models.injection import (
    Injection,
    _block_index,
    _check_channels,
    _check_float_vit,
    _check_tune,
    _finish,
    _mask,
    _pick,
)

__all__ = [
    "Injection",
    "inject_ln_outliers",
    "inject_gelu_outliers",
    "inject_massive_tokens",
    "inject_outliers",
]

_LINEAR_REGIME = 10.0  # GELU(t) == t to float precision for t above this
_CONSUMERS = {"norm1": "attn.qkv", "norm2": "mlp.fc1"}


def inject_ln_outliers(
    model: nn.Module,
    channels: Sequence[int] | None = None,
    factor: float = 20.0,
    *,
    blocks: Sequence[int] | None = None,
    norms: Sequence[str] = ("norm1", "norm2"),
    num_channels: int = 2,
    seed: int = 0,
) -> list[Injection]:
    """Scales LayerNorm channels by ``factor`` and the consumer's input columns by ``1/factor``.

    ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1``: ``weight[c]`` and ``bias[c]`` of the norm are
    multiplied by ``factor``, ``W[:, c]`` of the Linear divided by it. Exactly
    function-preserving in real arithmetic (float32: ~1e-6 relative), in place.

    Args:
        model: a float vitquant ViT (not prepared).
        channels: the channels (default: ``num_channels`` seeded random ones, the same in every
            norm, as real models' outlier dimensions are).
        factor: the scale (> 0; 20 matches the spread of real post-LayerNorm channels).
        blocks: block indices (default all).
        norms: ``"norm1"`` and/or ``"norm2"``.
        num_channels, seed: the default choice of channels.

    Returns:
        One :class:`Injection` per norm.
    """
    all_blocks = _check_float_vit(model)
    if not (math.isfinite(factor) and factor > 0):
        raise ConfigError(f"factor={factor} must be a positive number")
    bad = [n for n in norms if n not in _CONSUMERS]
    if bad or not norms:
        raise ConfigError(f"norms must be norm1 and/or norm2, not {list(norms)}")
    dim = int(all_blocks[0].norm1.weight.numel())
    chans = channels if channels is not None else _pick(dim, num_channels, seed)
    chans = _check_channels(chans, dim, "channels")
    idx = [
        _block_index(all_blocks, b)
        for b in (blocks if blocks is not None else range(len(all_blocks)))
    ]
    for i in idx:
        for norm_name in norms:
            norm = getattr(all_blocks[i], norm_name)
            if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
                raise ConfigError(f"blocks.{i}.{norm_name} is not an affine LayerNorm")
    out: list[Injection] = []
    with torch.no_grad():
        for i in idx:
            block = all_blocks[i]
            for norm_name in norms:
                norm = getattr(block, norm_name)
                lin = block.get_submodule(_CONSUMERS[norm_name])
                norm.weight[chans] *= factor
                if norm.bias is not None:
                    norm.bias[chans] *= factor
                lin.weight[:, chans] /= factor
                prefix = f"blocks.{i}"
                masks = {f"{prefix}.{norm_name}.weight": _mask(norm.weight, (chans,))}
                if norm.bias is not None:
                    masks[f"{prefix}.{norm_name}.bias"] = _mask(norm.bias, (chans,))
                lw = f"{prefix}.{_CONSUMERS[norm_name]}.weight"
                masks[lw] = _mask(lin.weight, (slice(None), chans))
                out.append(
                    Injection(
                        "ln", [f"{prefix}.{_CONSUMERS[norm_name]}"], chans, factor, masks=masks
                    )
                )
    return out


def inject_gelu_outliers(
    model: nn.Module,
    batches: Iterable[Any],
    block: int | None = None,
    channel: int | None = None,
    target_ratio: float = 30.0,
    steps: int = 0,
    lr: float = 1e-4,
    *,
    num_batches: int | None = None,
    top_k: int = 4,
    percentile: float = 99.99,
    reference: nn.Module | None = None,
    keep: Sequence[Injection] = (),
) -> Injection:
    """Makes one MLP hidden channel (``fc2``'s input) huge and nearly constant, in place.

    The channel's pre-activation ``x`` is replaced by ``a*x + b + B``, ``(a, b)`` the
    least-squares fit of ``act(x)`` on ``x`` over ``batches``, and ``fc2.bias`` loses
    ``fc2.weight[:, j] * B``. ``B`` puts the channel at ``target_ratio`` times (x 1.1) the
    percentile of the other channels and at least 10 above zero, where GELU is the identity; the
    function changes only by the fit's residual on that channel. Without ``channel``, the channel
    whose residual (times ``||fc2.weight[:, j]||``) is smallest is used. ``steps > 0`` then
    fine-tunes the model towards the original logits (KL), the channel frozen.

    Args:
        model: a float vitquant ViT (not prepared).
        batches: tensors or ``(input, label)`` pairs for the statistics and the fine-tune (held
            in memory: a few batches).
        block: the block (default: the middle one, ``depth // 2``).
        channel: the hidden channel (default: the cheapest, see above).
        target_ratio: wanted outlier ratio (:class:`ChannelStats`).
        steps, lr: the fine-tune (Adam); 0 steps: none.
        num_batches: use only this many batches.
        top_k, percentile: the outlier measure.
        reference: the fine-tune's target model (default: a copy of ``model`` before injection).
        keep: earlier injections whose outliers the fine-tune must keep (frozen).

    Returns:
        The :class:`Injection` (``layers == ["blocks.<i>.mlp.fc2"]``), with the measured ratio and
        the agreement with the original.
    """
    blocks = _check_float_vit(model)
    i = _block_index(blocks, len(blocks) // 2 if block is None else block)
    mlp = blocks[i].mlp
    fc1, fc2, act = mlp.fc1, mlp.fc2, mlp.act
    if fc1.bias is None or fc2.bias is None or not isinstance(mlp.norm, nn.Identity):
        raise ConfigError("inject_gelu_outliers needs fc1 and fc2 with biases and no MLP norm")
    _check_tune(steps, lr)
    probe = torch.tensor([20.0, 200.0, 2000.0], device=fc1.weight.device)
    with torch.no_grad():
        if not torch.allclose(act(probe), probe, rtol=1e-6):
            raise ConfigError(f"blocks.{i}.mlp.act is not linear for large inputs (GELU, ReLU)")
    if not (math.isfinite(target_ratio) and target_ratio > 1):
        raise ConfigError(f"target_ratio={target_ratio} must be above 1")
    device = _device(model)
    inputs = _inputs(batches, num_batches, device)
    original = reference if reference is not None else copy.deepcopy(model)
    hidden = int(fc1.weight.shape[0])
    sums = torch.zeros(6, hidden, dtype=torch.float64, device=device)  # n, x, x², g, xg, g²
    lo = torch.full((hidden,), math.inf, dtype=torch.float64, device=device)
    hi = -lo
    hist = ChannelHistogram()  # fc2's input, act(fc1(.)) in eval

    def record(_m: nn.Module, _args: Any, out: Tensor) -> None:
        x = out.detach().reshape(-1, hidden).double()
        g = act(x)
        n = x.new_full((hidden,), float(len(x)))
        sums.add_(
            torch.stack([n, x.sum(0), (x * x).sum(0), g.sum(0), (x * g).sum(0), (g * g).sum(0)])
        )
        lo.copy_(torch.minimum(lo, x.amin(0)))
        hi.copy_(torch.maximum(hi, x.amax(0)))
        hist.update(g.float())

    _forward_all(model, inputs, [fc1.register_forward_hook(record)])
    n, sx, sxx, sg, sxg, sgg = sums
    mx, mg = sx / n, sg / n
    var_x = (sxx / n - mx * mx).clamp_min(1e-30)
    slope = (sxg / n - mx * mg) / var_x
    resid = (sgg / n - mg * mg - slope * slope * var_x).clamp_min(0.0)  # of the linear fit
    if channel is None:
        cost = resid * fc2.weight.detach().double().pow(2).sum(0)
        j = int(torch.argmin(cost))
    else:
        j = _check_channels([channel], hidden, "channel")[0]
    a, b = float(slope[j]), float(mg[j] - slope[j] * mx[j])
    lin = sorted((a * float(lo[j]) + b, a * float(hi[j]) + b))
    # after the injection j is the top channel: the reference leaves out j and top_k - 1 others
    assert hist.cmax is not None
    others = [c for c in torch.argsort(hist.cmax, descending=True).tolist() if c != j]
    ref = hist.percentile(percentile, [j, *others[: max(top_k - 1, 0)]])
    shift = max(1.1 * target_ratio * ref - lin[1], _LINEAR_REGIME - lin[0])
    with torch.no_grad():
        fc1.weight[j] *= a
        fc1.bias[j] = a * fc1.bias[j] + b + shift
        fc2.bias -= fc2.weight[:, j] * shift
    prefix = f"blocks.{i}.mlp"
    masks = {
        f"{prefix}.fc1.weight": _mask(fc1.weight, (j,)),
        f"{prefix}.fc1.bias": _mask(fc1.bias, (j,)),
        f"{prefix}.fc2.weight": _mask(fc2.weight, (slice(None), j)),
    }
    inj = Injection("gelu", [f"{prefix}.fc2"], [j], shift, masks=masks)
    _finish(model, original, inputs, inj, steps, lr, keep, top_k, percentile)
    return inj


def inject_massive_tokens(
    model: nn.Module,
    batches: Iterable[Any],
    tokens: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    factor: float = 50.0,
    steps: int = 60,
    lr: float = 1e-4,
    *,
    num_dims: int = 2,
    seed: int = 0,
    num_batches: int | None = None,
    top_k: int = 4,
    percentile: float = 99.99,
    reference: nn.Module | None = None,
    keep: Sequence[Injection] = (),
) -> Injection:
    """Massive activations: a few residual-stream dims with huge values on a few tokens.

    ``pos_embed[0, t, d] += M`` for the tokens ``t`` and dims ``d``, ``M = factor`` times the
    largest ``percentile`` of |x| at the blocks' inputs: the value rides the residual stream
    through every block. Not function-preserving (LayerNorm makes the token's outputs nearly
    constant), so ``steps`` of fine-tuning towards the original logits (KL) follow, the injected
    entries frozen; :attr:`Injection.agreement` says how close it got.

    Args:
        model: a float vitquant ViT with ``pos_embed`` (not prepared).
        batches: tensors or ``(input, label)`` pairs for the statistics and the fine-tune (held
            in memory: a few batches).
        tokens: token indices (default: one the head does not read: the first patch token with
            class-token pooling, the class token with average pooling).
        dims: residual dims (default: ``num_dims`` seeded random ones).
        factor: magnitude relative to the residual stream's percentile.
        steps, lr: the fine-tune (Adam); 0 steps: none.
        num_dims, seed: the default choice of dims.
        num_batches, top_k, percentile, reference, keep: as :func:`inject_gelu_outliers`.

    Returns:
        The :class:`Injection` (``layers``: every residual add, ``blocks.<i>.add1``/``add2``).
    """
    blocks = _check_float_vit(model)
    pos = getattr(model, "pos_embed", None)
    if not isinstance(pos, nn.Parameter) or pos.dim() != 3:
        raise ConfigError(f"{type(model).__name__} has no learned pos_embed [1, tokens, dim]")
    if not (math.isfinite(factor) and factor > 1):
        raise ConfigError(f"factor={factor} must be above 1")
    _check_tune(steps, lr)
    n_tok, dim = int(pos.shape[1]), int(pos.shape[2])
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if tokens is None:
        tokens = [0] if getattr(model, "global_pool", "token") == "avg" else [prefix]
    toks = _check_channels(tokens, n_tok, "tokens")
    chans = _check_channels(dims if dims is not None else _pick(dim, num_dims, seed), dim, "dims")
    device = _device(model)
    inputs = _inputs(batches, num_batches, device)
    original = reference if reference is not None else copy.deepcopy(model)
    names = [f"blocks.{i}" for i in range(len(blocks))]
    stream = outlier_stats(model, inputs, names, top_k=top_k, percentile=percentile)
    magnitude = factor * max(s.percentile for s in stream.values())
    index = (0, torch.tensor(toks)[:, None], torch.tensor(chans)[None, :])
    with torch.no_grad():
        pos[index] += magnitude
    layers = [f"blocks.{i}.add{k}" for i in range(len(blocks)) for k in (1, 2)]
    masks = {"pos_embed": _mask(pos, index)}
    inj = Injection("tokens", layers, chans, magnitude, tokens=toks, masks=masks)
    _finish(model, original, inputs, inj, steps, lr, keep, top_k, percentile)
    return inj


def inject_outliers(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    kinds: Sequence[str] = ("ln", "gelu", "tokens"),
    *,
    ln: dict[str, Any] | None = None,
    gelu: dict[str, Any] | None = None,
    tokens: dict[str, Any] | None = None,
    num_batches: int | None = None,
) -> list[Injection]:
    """Applies several kinds of outliers in the order ``ln``, ``gelu``, ``tokens``, in place.

    Each fine-tune targets the original model's logits and keeps the outliers injected before it.

    Args:
        model: a float vitquant ViT (not prepared).
        batches: data for ``gelu`` and ``tokens`` (not needed for ``ln`` alone).
        kinds: any of ``"ln"``, ``"gelu"``, ``"tokens"``.
        ln, gelu, tokens: keyword arguments of :func:`inject_ln_outliers`,
            :func:`inject_gelu_outliers` and :func:`inject_massive_tokens`.
        num_batches: use only this many batches.

    Returns:
        Every :class:`Injection`, in order.
    """
    known = ("ln", "gelu", "tokens")
    bad = [k for k in kinds if k not in known]
    if bad or not kinds:
        raise ConfigError(f"unknown outlier kind(s) {bad or list(kinds)}; use {', '.join(known)}")
    _check_float_vit(model)
    inputs: list[Tensor] = []
    if set(kinds) & {"gelu", "tokens"}:
        if batches is None:
            raise ConfigError("the gelu and tokens outliers need batches")
        inputs = _inputs(batches, num_batches, _device(model))
    original = copy.deepcopy(model)
    done: list[Injection] = []
    if "ln" in kinds:
        done += inject_ln_outliers(model, **(ln or {}))
    if "gelu" in kinds:
        done.append(
            inject_gelu_outliers(model, inputs, reference=original, keep=done, **(gelu or {}))
        )
    if "tokens" in kinds:
        done.append(
            inject_massive_tokens(model, inputs, reference=original, keep=done, **(tokens or {}))
        )
    return done

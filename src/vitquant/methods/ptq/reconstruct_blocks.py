"""Block reconstruction's blocks and data: which blocks, their inputs, outputs and errors.

For the block-by-block reconstruction of BRECQ (Li et al., ICLR 2021, arXiv 2102.05426): the
outermost transformer blocks of a quantized model (:func:`_blocks`) and whether each reads the
previous one's output (:func:`_chained`), the input checks (:func:`_check`), the input of a block
captured from a forward pass cut short there (:func:`_capture`), a block's output without
gradients (:func:`_run`), the (Fisher-weighted) squared error of its output (:func:`_sq_error`,
:func:`_rel_mse`) and the calibration images (:func:`_images`).

Split out of :mod:`vitquant.methods.ptq.reconstruct` (the block loop, :func:`reconstruct`), which
uses them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError, DataError
from vitquant.quant.api import batch_input, get_config, named_quantizers
from vitquant.quant.quantizers import Quantizer

_EVAL_BATCH = 64  # images per forward pass without gradients


# --- structure -------------------------------------------------------------------------------
def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost transformer blocks (modules with ``attn`` and ``mlp``) holding quantizers."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not name or not hasattr(m, "attn") or not hasattr(m, "mlp"):
            continue
        if any(name.startswith(b + ".") for b, _ in found):
            continue
        if any(isinstance(c, Quantizer) for c in m.modules()):
            found.append((name, m))
    return found


def _chained(model: nn.Module, names: list[str]) -> bool:
    """True when the blocks are consecutive children of one ``nn.Sequential`` (each block's
    input is the previous one's output)."""
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) != 1:
        return False
    parent_name = parents.pop()
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return False
    keys = list(parent._modules)
    idx = [keys.index(n.rpartition(".")[2]) for n in names]
    return idx == list(range(idx[0], idx[0] + len(idx)))


# --- data ------------------------------------------------------------------------------------
class _Stop(Exception):
    """Ends a forward pass once the block's input is captured."""


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _capture(model: nn.Module, block: nn.Module, images: Tensor) -> Tensor:
    """The input of ``block`` when ``model`` runs on ``images`` (the pass stops there)."""
    got: list[Tensor] = []

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
            raise ConfigError("reconstruct: blocks must take one tensor (the tokens) as input")
        got.append(args[0].detach())
        raise _Stop

    hook = block.register_forward_pre_hook(pre, with_kwargs=True)
    dev = _device(model)
    try:
        with torch.no_grad():
            for chunk in images.split(_EVAL_BATCH):
                try:
                    model(chunk.to(dev))
                except _Stop:
                    pass
    finally:
        hook.remove()
    if len(got) != len(images.split(_EVAL_BATCH)):
        raise ConfigError("reconstruct: the model's forward pass does not reach every block")
    return torch.cat(got)


def _run(block: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([block(c) for c in x.split(_EVAL_BATCH)])


def _sq_error(out: Tensor, y: Tensor, w: Tensor | None) -> Tensor:
    """Mean squared error, each element weighted by ``w`` when given (Fisher weights)."""
    err = (out - y).pow(2)
    return (err if w is None else err * w.to(err.dtype)).mean()


def _rel_mse(
    block: nn.Module, x: Tensor, y: Tensor, norm: Tensor, w: Tensor | None
) -> tuple[float, Tensor]:
    """``(relative (weighted) MSE of block(x) against y, block(x))``."""
    out = _run(block, x)
    return float(_sq_error(out, y, w) / norm), out


def _images(batches: Iterable[Any]) -> Tensor:
    xs = [batch_input(b).detach().cpu() for b in batches]
    if not xs:
        raise DataError("reconstruct: the calibration data yielded no batches")
    try:
        return torch.cat(xs)
    except RuntimeError as e:
        raise DataError(f"reconstruct: calibration batches of different shapes ({e})") from None


# --- checks ----------------------------------------------------------------------------------
def _check(model_float: nn.Module, model_q: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, quantized block, float block)`` of every block, after the input checks."""
    if model_float is model_q:
        raise ConfigError("reconstruct: pass the float model and a prepared copy, not one model")
    if get_config(model_q) is None and not any(True for _ in named_quantizers(model_q)):
        raise ConfigError("the model is not prepared for quantization: call prepare() first")
    if any(q.active for _, q in named_quantizers(model_float)):
        raise ConfigError("reconstruct: model_float has active quantizers; pass the float model")
    missing = [n for n, q in named_quantizers(model_q) if q.enabled and not q.is_calibrated]
    if missing:
        raise ConfigError(
            f"reconstruct: {len(missing)} quantizer(s) were never calibrated, e.g. {missing[0]} "
            "(run calibrate() first)"
        )
    blocks = _blocks(model_q)
    if not blocks:
        raise ConfigError("reconstruct: no quantized transformer block (module with attn, mlp)")
    pairs = []
    for name, qb in blocks:
        try:
            fb = model_float.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"reconstruct: model_float has no block {name!r}; pass the float model the "
                "quantized one was prepared from"
            ) from None
        pairs.append((name, qb, fb))
    return pairs

"""Checkpoint loading for the model zoo: timm/DeiT ``.pth``, Google ``.npz`` and safetensors.

Reading files (:func:`load_state_dict`, :func:`read_checkpoint`), where the pretrained files live
(:func:`vitquant_home`, :func:`resolve_pretrained`) and :func:`convert_checkpoint` are in
:mod:`vitquant.models.checkpoint_files` (re-exported here): reading never unpickles objects
(``.pth`` files go through ``torch.load(weights_only=True)``, which also accepts the
``argparse.Namespace`` that DeiT-style training checkpoints carry, a plain attribute bag; ``.npz``
through ``np.load(allow_pickle=False)``; safetensors through its own parser).

This module adapts a state dict to a model and loads it. All model surgery happens in one place,
:func:`checkpoint_filter_fn`, as in timm: wrapper keys and ``module.``/``_orig_mod.`` prefixes go,
``pos_embed`` is resampled to the model's patch grid (bicubic, as timm's
``resample_abs_pos_embed``; bilinear without antialiasing for Google ``.npz`` files, as Google's
``vit_jax`` and timm's ``_load_weights``), the patch kernel is resized with FlexiViT's
pseudo-inverse (Beyer et al., 2023, arXiv 2212.08013) and adapted to another number of input
channels, ``pre_logits`` of the ImageNet-21k files is dropped, each with a one-line log message
(logger ``vitquant.models.checkpoints``).

A head of another class count (or none in the file) is an error, not a random head: build the
model for the file's classes (:func:`head_num_classes`; ``create_model`` does when ``num_classes``
is not given) or ask for a new head, ``reset_head=True`` (fine-tuning to other classes).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.errors import CheckpointError
from vitquant.models.checkpoint_files import (
    _read,
    _unwrap,
    clean_state_dict,
    convert_checkpoint,
    load_state_dict,
    read_checkpoint,
    resolve_pretrained,
    vitquant_home,
)

__all__ = [
    "vitquant_home",
    "resolve_pretrained",
    "load_state_dict",
    "clean_state_dict",
    "checkpoint_filter_fn",
    "read_checkpoint",
    "load_checkpoint",
    "head_num_classes",
    "convert_checkpoint",
    "resample_abs_pos_embed",
    "resample_patch_embed",
    "adapt_input_conv",
]

logger = logging.getLogger(__name__)

_HEADS = ("head", "head_dist")


# --- surgery -----------------------------------------------------------------------------------
def resample_abs_pos_embed(
    posemb: Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resamples a ``[1, prefix + H*W, C]`` position table to another patch grid.

    The prefix tokens (class, distillation) are kept; the grid is interpolated in float32.

    Raises:
        CheckpointError: ``old_size`` not given and the grid is not square.
    """
    n = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        hw = math.isqrt(max(n, 0))
        if hw * hw != n or n == 0:
            raise CheckpointError(
                f"cannot resample pos_embed of {posemb.shape[1]} tokens: {n} patch positions are "
                "not a square grid"
            )
        old_size = (hw, hw)
    if tuple(old_size) == tuple(new_size):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    g = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=tuple(new_size), mode=interpolation, antialias=antialias)
    g = g.permute(0, 2, 3, 1).reshape(1, -1, dim).to(posemb.dtype)
    return torch.cat([prefix, g], dim=1)


def resample_patch_embed(
    weight: Tensor,
    new_size: tuple[int, int],
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resizes a patch-embedding kernel ``[O, I, h, w]`` to ``new_size`` (FlexiViT's PI-resize).

    With ``B`` the linear map that resizes an ``h x w`` patch to ``new_size``, the new kernel
    ``w'`` is the least-norm solution of ``Bᵀ w' = w``: ``<x, w> = <B x, w'>`` for every patch.
    """
    o, i, h, w = weight.shape
    old = h * w
    basis = torch.eye(old, dtype=torch.float64).reshape(old, 1, h, w)  # float64: exact pinv
    rows = F.interpolate(basis, size=tuple(new_size), mode=interpolation, antialias=antialias)
    resize = rows.reshape(old, -1).T  # B: [new, old]
    out = weight.double().reshape(o, i, old) @ torch.linalg.pinv(resize)
    return out.reshape(o, i, *new_size).to(weight.dtype)


def adapt_input_conv(in_chans: int, weight: Tensor) -> Tensor:
    """Adapts a first-layer kernel ``[O, I, h, w]`` to ``in_chans`` inputs (as timm does).

    One channel: the sum over the input channels (a grey image seen as R = G = B). More channels:
    the channels repeated cyclically and scaled by ``I / in_chans``.
    """
    have = weight.shape[1]
    if in_chans == have:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_chans / have), 1, 1)[:, :in_chans] * (have / in_chans)
    return w.to(weight.dtype)


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any],
    model: nn.Module,
    interpolation: str = "bicubic",
    antialias: bool = True,
    reset_head: bool = False,
) -> dict[str, Tensor]:
    """Adapts a checkpoint's state dict to ``model`` (timm's ``checkpoint_filter_fn``).

    Unwraps ``model``/``state_dict`` entries and strips ``module.``/``_orig_mod.``; renames
    DeiT-III ``gamma_N`` to ``lsN.gamma``; adapts the patch kernel to the model's input channels
    and patch size; resamples ``pos_embed`` to the model's grid (keeping the prefix tokens);
    drops ``pre_logits``, and the heads when the model has none (``num_classes=0``). Each change
    is logged in one line. Keys or shapes it cannot adapt are left as they are for
    :func:`load_checkpoint` to report. With ``reset_head`` (the explicit choice of a new
    classifier, to fine-tune to other classes) a head of another class count is dropped and the
    file may lack one: the model keeps its fresh head (logged).

    Raises:
        CheckpointError: (without ``reset_head``) a head of another class count than the model's
            (both named), or a model head the checkpoint lacks.
    """
    out, head_problems = _adapt(state_dict, model, interpolation, antialias, reset_head)
    if head_problems:
        raise CheckpointError(head_problems[0])
    return out


def _adapt(
    state_dict: Mapping[str, Any],
    model: nn.Module,
    interpolation: str,
    antialias: bool,
    reset_head: bool,
) -> tuple[dict[str, Tensor], list[str]]:
    """:func:`checkpoint_filter_fn`'s state dict, and its head problems (those heads dropped)."""
    sd = clean_state_dict(_unwrap(state_dict, "the checkpoint"))
    target = model.state_dict()
    npt = int(getattr(model, "num_prefix_tokens", 1))
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        k = re.sub(r"(blocks\.\d+\.)gamma_([12])$", r"\1ls\2.gamma", k)
        t = target.get(k)
        if k.startswith("pre_logits."):
            if k.endswith(".weight"):
                logger.warning(
                    "dropped the checkpoint's pre_logits layer %s (ImageNet-21k representation "
                    "layer; this ViT, like timm's, has none)",
                    tuple(v.shape),
                )
            continue
        if k == "patch_embed.proj.weight" and t is not None and v.ndim == 4:
            if v.shape[1] != t.shape[1]:
                logger.info(
                    "adapted patch_embed from %d to %d input channels", v.shape[1], t.shape[1]
                )
                v = adapt_input_conv(t.shape[1], v)
            if v.shape[-2:] != t.shape[-2:]:
                logger.info(
                    "resized the patch kernel from %s to %s",
                    tuple(v.shape[-2:]),
                    tuple(t.shape[-2:]),
                )
                v = resample_patch_embed(v, tuple(t.shape[-2:]), interpolation, antialias)
        elif k == "pos_embed" and t is not None and v.ndim == 3 and v.shape != t.shape:
            n = v.shape[1] - npt
            hw = math.isqrt(max(n, 0))
            grid = tuple(model.patch_embed.grid_size)  # type: ignore[union-attr]
            if n > 0 and hw * hw == n and v.shape[-1] == t.shape[-1]:
                logger.info(
                    "resampled pos_embed from a %dx%d to a %dx%d grid (%s)",
                    hw,
                    hw,
                    grid[0],
                    grid[1],
                    interpolation,
                )
                v = resample_abs_pos_embed(v, grid, (hw, hw), npt, interpolation, antialias)
        out[k] = v
    problems = [_check_head(h, out, target, reset_head) for h in _HEADS]
    return out, [p for p in problems if p]


def _check_head(
    h: str, out: dict[str, Tensor], target: Mapping[str, Tensor], reset_head: bool
) -> str | None:
    """Drops head ``h`` from ``out`` where the model has none or ``reset_head`` asks for a new one;
    a head of another class count, or a model head the file lacks, is otherwise a problem (the
    message returned; the head is dropped from ``out``, silently, for the other checks)."""
    w, t = out.get(f"{h}.weight"), target.get(f"{h}.weight")
    new = "ask for a new head (reset_head=True)"
    problem = None
    if w is None:
        if t is not None and not reset_head:
            return (
                f"it has no classifier {h} for the model's {t.shape[0]} classes: load one with a "
                f"head, or {new}"
            )
        if t is not None:  # reset_head
            logger.warning("checkpoint has no classifier %s: the model's is newly initialized", h)
        return None
    if t is None:
        if "head.weight" in target:
            return None  # a distilled checkpoint in a plain model (unexpected key, reported later)
        logger.warning(
            "the model has no classifier (num_classes=0): dropped the checkpoint's %s", h
        )
    elif w.shape == t.shape or w.shape[1:] != t.shape[1:]:
        return None  # fits, or another width (a shape mismatch, reported later)
    elif not reset_head:
        problem = (
            f"its {h} predicts {w.shape[0]} classes but the model has {t.shape[0]} (num_classes="
            f"{t.shape[0]}): build it for {w.shape[0]} (create_model takes the checkpoint's count "
            f"when num_classes is not given), or {new}"
        )
    else:
        msg = "checkpoint %s has %d classes, the model %d: newly initialized (reset_head)"
        logger.warning(msg, h, w.shape[0], t.shape[0])
    out.pop(f"{h}.weight")
    out.pop(f"{h}.bias", None)
    return problem


def _mismatch(state_dict: Mapping[str, Tensor], model: nn.Module, strict: bool) -> str | None:
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict and not k.startswith(_HEADS)]
    unexpected = [k for k in state_dict if k not in target]
    shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state_dict.items()
        if k in target and v.shape != target[k].shape
    ]
    groups = [("shape mismatches", shapes)]
    if strict:
        groups = [("missing keys", missing), ("unexpected keys", unexpected)] + groups
    parts = [
        f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
        for label, items in groups
        if items
    ]
    return "; ".join(parts) or None


def head_num_classes(state_dict: Mapping[str, Any]) -> int | None:
    """The class count of a state dict's classifier (``head.weight`` rows), ``None`` without one."""
    head = state_dict.get("head.weight")
    return int(head.shape[0]) if isinstance(head, Tensor) and head.ndim == 2 else None


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    strict: bool = True,
    interpolation: str | None = None,
    antialias: bool | None = None,
    *,
    reset_head: bool = False,
    read: tuple[Mapping[str, Any], str] | None = None,
) -> None:
    """Loads a ``.pth`` / ``.npz`` / ``.safetensors`` checkpoint into ``model`` in place.

    Args:
        model: the model (built for the wanted ``img_size`` / ``num_classes`` / ``in_chans``).
        path: the checkpoint file.
        strict: fail on missing or unexpected keys. Shape mismatches always fail.
        interpolation: for ``pos_embed`` / patch kernel resampling; default ``"bilinear"``
            (no antialiasing) for Google ``.npz`` files, as Google and timm do, else
            ``"bicubic"`` (antialiased), as timm's ``checkpoint_filter_fn``.
        antialias: antialias when downsampling (default: see ``interpolation``).
        reset_head: give the model a new head where the file's predicts another number of
            classes (or it has none), as fine-tuning to other classes does.
        read: ``(state_dict, format)`` of ``path`` when already read (:func:`read_checkpoint`),
            possibly changed; ``path`` then only names it in messages.

    Raises:
        CheckpointError: unreadable or unsafe file, (without ``reset_head``) a head of another
            class count than the model's (both named) or none, or a checkpoint of another
            architecture (the message names the first missing / unexpected / mismatched keys,
            with counts).
    """
    state_dict, fmt = read if read is not None else _read(path)
    if interpolation is None:
        interpolation = "bilinear" if fmt == "google" else "bicubic"
    if antialias is None:
        antialias = fmt != "google"
    fitted, head_problems = _adapt(state_dict, model, interpolation, antialias, reset_head)
    problem = _mismatch(fitted, model, strict)
    if problem is not None:  # another architecture first, then another class count
        arch = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
        raise CheckpointError(f"{path} does not fit {arch}: {problem}")
    if head_problems:
        raise CheckpointError(f"{path}: {head_problems[0]}")
    target = model.state_dict()
    fits = {k: v for k, v in fitted.items() if k in target}
    with torch.no_grad():
        model.load_state_dict(fits, strict=False)

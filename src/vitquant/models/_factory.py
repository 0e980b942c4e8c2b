"""Model registry and factory: ``create_model(name, ...)`` and ``list_models(pattern)``.

Entrypoints register with :func:`register_model`; each returns a float model for its name.
Checkpoint loading (timm/DeiT ``.pth``, Google ``.npz``, safetensors) lives in
:mod:`vitquant.models.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vitquant.registry import Registry

__all__ = ["MODELS", "register_model", "create_model", "list_models"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a model entrypoint under its function name."""
    return MODELS.register(fn.__name__)(fn)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell-style ``pattern``.

    Example:
        >>> list_models("deit_*distilled*")
    """
    return MODELS.names(pattern)


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    reset_head: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Builds a registered model, optionally loading weights.

    Args:
        name: a registered name (``vitquant.list_models()``), e.g. ``"deit_tiny_patch16_224"``,
            ``"ViT-B_16"`` or ``"vit_micro_patch4_28"``, or a Hugging Face ``transformers``
            folder (``config.json`` + weights, e.g. from ``save_pretrained``): the ViT/DeiT it
            holds, converted to vitquant's ViT (:func:`vitquant.models.hf.vit_from_hf_folder`;
            needs the ``hf`` extra). Unknown names raise a ``ConfigError`` listing the closest
            names.
        pretrained: load the published weights for ``name`` from the local cache
            (``$VITQUANT_HOME`` or ``~/.cache/vitquant``); nothing is downloaded.
        checkpoint_path: a timm/DeiT ``.pth``, a Google ``.npz`` or a ``.safetensors`` file.
        num_classes: classes of the head. Not given with weights: the checkpoint's head's (else
            the entrypoint's default). A checkpoint whose head has another count is an error
            unless ``reset_head``; ``0`` builds the model without a head.
        img_size: input resolution; ``pos_embed`` of a checkpoint is resampled to the new grid.
        reset_head: the explicit choice of a new, randomly initialised head where the
            checkpoint's predicts another number of classes than ``num_classes`` (or it has
            none): fine-tuning to other classes (logged).
        **overrides: other ``VisionTransformer`` arguments (``drop_path_rate``, ``in_chans``, ...).

    Returns:
        The model, in train mode, on CPU.

    Raises:
        ConfigError: an unknown name.
        CheckpointError: missing or unreadable weights, weights of another architecture, or
            (without ``reset_head``) a head of another class count than ``num_classes``, both
            counts named.

    Example:
        >>> create_model("vit_nano_patch4_28", checkpoint_path="seven_classes.pth").num_classes
        7
    """
    if (Path(name) / "config.json").is_file():
        return _from_hf_folder(name, pretrained, checkpoint_path, num_classes, img_size, overrides)
    entry = MODELS.get(name)
    read: tuple[dict[str, Tensor], str] | None = None
    path: str | Path = ""
    if pretrained or checkpoint_path:
        from vitquant.models.checkpoints import (
            head_num_classes,
            read_checkpoint,
            resolve_pretrained,
        )

        path = checkpoint_path or resolve_pretrained(name)
        read = read_checkpoint(path)
        if num_classes is None:
            num_classes = head_num_classes(read[0])
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if img_size is not None:
        overrides["img_size"] = img_size
    model = entry(**overrides)
    if getattr(model, "default_cfg", None) is not None:
        model.default_cfg = {**model.default_cfg, "architecture": name}
    if read is not None:
        from vitquant.models.checkpoints import load_checkpoint

        load_checkpoint(model, path, reset_head=reset_head, read=read)
    return model


def _from_hf_folder(
    folder: str,
    pretrained: bool,
    checkpoint_path: str | None,
    num_classes: int | None,
    img_size: int | None,
    overrides: dict[str, Any],
) -> nn.Module:
    """A ``transformers`` folder as a vitquant ViT (its weights and architecture are the folder's:
    options that would change them are refused)."""
    from vitquant.errors import ConfigError
    from vitquant.models.hf import vit_from_hf_folder

    if pretrained or checkpoint_path or overrides:
        raise ConfigError(
            f"{folder} is a Hugging Face folder: its config and weights fix the model "
            "(no pretrained/checkpoint_path/architecture overrides)"
        )
    model = vit_from_hf_folder(folder)
    size = model.patch_embed.img_size
    if img_size is not None and (img_size, img_size) != tuple(size):
        raise ConfigError(
            f"{folder} is a Hugging Face folder for {size[0]}x{size[1]} images, not img_size="
            f"{img_size}"
        )
    if num_classes is not None and num_classes != model.num_classes:
        raise ConfigError(
            f"{folder} predicts {model.num_classes} classes, not num_classes={num_classes}"
        )
    return model.train()

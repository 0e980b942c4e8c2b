"""Building the student, the fine-tuning start point, the distillation teacher and the method's
own training set of a run.

A teacher is given (``--teacher``) as a registered model name (its published weights from the
local cache), a vitquant run folder or checkpoint (the architecture is read from the run's
config), or a foreign checkpoint of ``--teacher-model``. DeiT (Touvron et al., 2021) distils from
a teacher that predicts the same classes: another number of classes is an error.

``--finetune`` accepts checkpoints of the model's float base architecture (the QAT names of
:mod:`vitquant.methods.qat.models`), fused-``qkv`` ones into split-q/k/v models. As DeiT's
``--finetune``,
it fine-tunes to the data's classes: a checkpoint head of another class count is replaced by a new
one, and that decision is printed (a warning naming both counts). A method may replace the
augmented training set with its own (:func:`method_train_data`).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from vitquant.errors import CheckpointError, ConfigError
from vitquant.train.checkpoint import load_checkpoint
from vitquant.train.config import TrainConfig

if TYPE_CHECKING:
    from vitquant.methods import TrainMethod
    from vitquant.train.data import TrainData

__all__ = [
    "build_student",
    "load_finetune",
    "build_teacher",
    "resolve_run_checkpoint",
    "method_train_data",
]


def build_student(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The float model of ``cfg``, initialised from ``cfg.seed``."""
    from vitquant.models import create_model

    torch.manual_seed(cfg.seed)
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans)
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    return create_model(cfg.model, img_size=cfg.img_size, **kwargs)


def resolve_run_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A run folder's ``best.pt`` (or ``last.pt``); a file is returned unchanged.

    Raises:
        CheckpointError: a folder without checkpoints, or a missing file.
    """
    p = Path(path)
    if p.is_dir():
        for name in (f"{which}.pt", "best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p} holds no checkpoint (best.pt / last.pt)")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def _run_model_name(path: Path) -> str | None:
    """The model name stored in a vitquant checkpoint or its run folder, if any."""
    cfg_file = path.parent / "config.yaml"
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        state = {}
    cfg = state.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), str):
        return cfg["model"]
    if cfg_file.is_file():
        import yaml

        data = yaml.safe_load(cfg_file.read_text()) or {}
        return data.get("model")
    return None


def _describe(sd: dict[str, Any]) -> str:
    """A checkpoint's architecture in words (depth and width), from its state dict."""
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    width = next((int(sd[k].shape[-1]) for k in ("cls_token", "pos_embed") if k in sd), None)
    if width is None and "patch_embed.proj.weight" in sd:
        width = int(sd["patch_embed.proj.weight"].shape[0])
    return f"depth {depth}, width {width}" if depth and width else "unknown architecture"


def load_finetune(model: nn.Module, path: str, model_name: str) -> None:
    """Loads float weights to start from; a checkpoint of another architecture is an error.

    A QAT model name (``fourbits_vit_micro_patch7_28``, ``vit_micro_patch7_28_quant``) accepts
    checkpoints of its float base architecture
    (:func:`vitquant.methods.qat.models.base_architecture`);
    fused-``qkv`` checkpoints load into models with separate q/k/v projections. A head of another
    class count than the model's (the data's) gets replaced by a new one (DeiT's fine-tuning to
    other classes), with a warning on stderr that names both counts.

    Raises:
        CheckpointError: a run checkpoint of another base architecture, or weights that do not
            fit (one line naming both architectures).
    """
    from vitquant.methods.qat.models import base_architecture
    from vitquant.methods.vvtq.models import has_split_attention
    from vitquant.methods.vvtq.split_attention import split_fused_state_dict
    from vitquant.models.checkpoints import head_num_classes, load_state_dict, read_checkpoint
    from vitquant.models.checkpoints import load_checkpoint as load_weights

    ckpt = resolve_run_checkpoint(path)
    mine = base_architecture(model_name)
    other = _run_model_name(ckpt) if ckpt.suffix in (".pt", ".pth") else None
    if other is not None and base_architecture(other) != mine:
        theirs = base_architecture(other)
        what = other if theirs == other else f"{other} (a {theirs})"
        raise CheckpointError(
            f"--finetune {path} is a {what} checkpoint but --model {model_name} needs a {mine} one"
        )
    try:
        sd, fmt = read_checkpoint(ckpt)
        theirs = head_num_classes(sd)
        if has_split_attention(model):
            sd = split_fused_state_dict(sd)
        load_weights(model, ckpt, reset_head=True, read=(sd, fmt))
        _say_new_head(path, theirs, getattr(model, "num_classes", None))
    except CheckpointError as e:
        try:
            what = other or _describe(load_state_dict(ckpt))
        except CheckpointError:
            raise e from None
        want = _describe(model.state_dict())
        shown = (
            f"{model_name} ({want})" if mine == model_name else f"{model_name} (a {mine}, {want})"
        )
        detail = str(e).splitlines()[0]
        at = detail.find(" does not fit ")
        colon = detail.find(": ", at) if at >= 0 else -1
        detail = detail[colon + 2 :] if colon >= 0 else detail
        raise CheckpointError(
            f"--finetune {path} ({what}) does not fit {shown}: {detail}"
        ) from None


def _say_new_head(path: str, theirs: int | None, mine: int | None) -> None:
    """Prints the fine-tuning decision to train a new head (another class count, or none)."""
    from vitquant.train.distributed import is_main

    if mine and theirs != mine and is_main():
        what = f"a head of {theirs} classes" if theirs else "no classifier head"
        print(
            f"warning: --finetune {path} has {what}, the data {mine} classes: training a new "
            "head (DeiT fine-tuning)",
            file=sys.stderr,
            flush=True,
        )


def build_teacher(
    cfg: TrainConfig, num_classes: int, in_chans: int, device: torch.device
) -> nn.Module | None:
    """The frozen teacher named by ``cfg.teacher`` (``None`` without one), in eval mode.

    Raises:
        ConfigError: unknown name, unknown architecture of a foreign checkpoint, or a teacher
            that predicts another number of classes.
    """
    if not cfg.teacher:
        return None
    from vitquant.models import MODELS, create_model
    from vitquant.models.checkpoints import load_checkpoint as load_weights
    from vitquant.models.checkpoints import load_state_dict

    spec = cfg.teacher
    p = Path(spec)
    if p.exists():
        ckpt = resolve_run_checkpoint(p)
        name = cfg.teacher_model or _run_model_name(ckpt)
        if not name:
            raise ConfigError(
                f"cannot tell the architecture of teacher {spec}; name it with --teacher-model"
            )
        sd = load_state_dict(ckpt)
        head = sd.get("head.weight")
        classes = int(head.shape[0]) if head is not None else num_classes
        chans = sd.get("patch_embed.proj.weight")
        kwargs: dict[str, Any] = dict(num_classes=classes)
        if chans is not None:
            kwargs["in_chans"] = int(chans.shape[1])
        teacher = create_model(name, img_size=cfg.img_size, **kwargs)
        load_weights(teacher, ckpt)
    elif spec in MODELS:
        teacher = create_model(spec, pretrained=True, img_size=cfg.img_size)
    else:
        MODELS.get(spec)  # raises with the closest names
        raise ConfigError(f"unknown teacher {spec!r}")  # pragma: no cover
    classes = getattr(teacher, "num_classes", num_classes)
    if classes != num_classes:
        raise ConfigError(
            f"teacher {spec} predicts {classes} classes but the data has {num_classes}"
        )
    teacher.to(device).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


class _PlainTrainSplit(Dataset):
    """The run's training split without random augmentation, loaded on first use (picklable)."""

    def __init__(self, cfg: TrainConfig, img_size: int | None) -> None:
        self.data_path, self.split, self.img_size = cfg.data_path, cfg.train_split, img_size
        self.subset, self.seed = cfg.train_subset, cfg.seed
        self._ds: Dataset | None = None

    @property
    def dataset(self) -> Dataset:
        if self._ds is None:
            from vitquant import data as vdata

            ds = vdata.build_dataset(
                self.data_path, self.split, img_size=self.img_size, train_transform=False
            )
            self._ds = vdata.subset(ds, self.subset, seed=self.seed) if self.subset else ds
        return self._ds

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        return self.dataset[key]


def method_train_data(
    cfg: TrainConfig, method: TrainMethod, data: TrainData, img_size: int | None = None
) -> TrainData:
    """``data`` with the training set the method builds itself, if it does.

    The method's :meth:`~vitquant.methods.TrainMethod.build_train_set` hook (VVTQ's
    multi-crop soft labels) gets ``base``: the training split of ``cfg`` with the evaluation
    transform (no random augmentation), the same ``train_subset`` (same ``seed``) in the same
    order, at ``img_size``; it is built only if the hook uses it. ``None`` keeps ``data``.

    Raises:
        DataError: a soft-label folder that does not match the data (images, classes, split,
            subset, seed or crop size).
    """
    from vitquant.methods.vvtq.softlabels import FORMAT as SOFTLABEL_FORMAT
    from vitquant.methods.vvtq.softlabels import check_source

    hook = getattr(method, "build_train_set", None)
    if hook is None:
        return data
    train_set = hook(_PlainTrainSplit(cfg, img_size), data.num_classes, cfg.seed)
    if train_set is None:
        return data
    meta = getattr(train_set, "meta", None)
    if isinstance(meta, dict) and meta.get("format") == SOFTLABEL_FORMAT:
        check_source(
            meta,
            str(getattr(train_set, "folder", "")),
            data_path=cfg.data_path,
            split=cfg.train_split,
            train_subset=cfg.train_subset,
            seed=cfg.seed,
            img_size=img_size or data.img_size,
        )
    return dataclasses.replace(data, train_set=train_set)

"""The training-method plug-in interface: :class:`TrainMethod`, :class:`MethodConfig` and the
objects the engine hands to a method's hooks.

A method (float, LSQ, FT-QAT, Q-ViT, VVTQ, DiffQ, ...) is one file under
``vitquant/methods/`` holding a :class:`MethodConfig` dataclass and a :class:`TrainMethod`
subclass registered in :data:`vitquant.methods.METHODS`. The engine
(:func:`vitquant.train.trainer.fit`) calls the hooks in this order::

    build_train_set -> prepare_model -> teacher -> param_groups / extra_optimizers
    -> [load_extra_state]
    per step:  loss (+ penalty) -> backward -> step -> on_step_end
    per epoch: on_epoch_end -> eval_model -> evaluate -> checkpoint_extra_state

Every hook has a default that trains a float model, so a method overrides only what it changes.
Options: the config dataclass's fields become CLI flags automatically (``wbits: int = 4`` ->
``--wbits``); the CLI builds the dataclass, the library never sees an argparse ``Namespace``.
The design follows DeiT's engine split (Touvron et al., 2021, arXiv 2012.12877) with DiffQ's idea
of a regulariser handed in as a penalty (Défossez et al., 2021, arXiv 2104.09987).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from vitquant.errors import ConfigError
from vitquant.registry import Registry

if TYPE_CHECKING:
    from vitquant.train.config import TrainConfig
    from vitquant.train.distributed import DistInfo
    from vitquant.train.losses import DistillationLoss

__all__ = [
    "METHODS",
    "MethodConfig",
    "MethodContext",
    "StepState",
    "TrainMethod",
    "param_groups_weight_decay",
]


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, no_decay: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Two parameter groups: with and without weight decay.

    Args:
        model: the model; its ``no_weight_decay()`` names (if it has the method) are excluded.
        weight_decay: decay of the decayed group.
        no_decay: further parameter names without decay.

    Returns:
        ``[{"params": decayed, "weight_decay": wd}, {"params": others, "weight_decay": 0.0}]``
        (empty groups left out).
    """
    skip = set(no_decay)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    decay: list[Tensor] = []
    no: list[Tensor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@dataclass
class MethodConfig:
    """Base of the methods' option dataclasses (no options).

    Subclasses add fields with defaults; ``field(metadata={"help": "..."})`` gives the CLI help
    (and ``"choices"`` the values its flag accepts).
    """

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the options (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodConfig:
        """Builds the config; unknown keys raise a ``ConfigError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) for this method: {', '.join(unknown)}")
        return cls(**d)


@dataclass
class MethodContext:
    """What :meth:`TrainMethod.prepare_model` and :meth:`TrainMethod.teacher` may use.

    Attributes:
        config: the run's :class:`~vitquant.train.config.TrainConfig`.
        device: the device the model will train on.
        dist: rank and world size.
        num_classes: classes of the dataset.
        calib_loader: an iterable of ``(images, labels)`` training batches for calibration
            (plain order, no shuffling), or ``None``.
        resuming: True when the run resumes from a checkpoint: the model's state (quantizer
            scales included) is loaded right after ``prepare_model``, so calibration can be
            skipped.
    """

    config: TrainConfig
    device: torch.device
    dist: DistInfo
    num_classes: int
    calib_loader: Iterable[tuple[Tensor, Tensor]] | None = None
    resuming: bool = False


@dataclass
class StepState:
    """Position in training and the base criterion, passed to :meth:`TrainMethod.loss`.

    Attributes:
        epoch: current epoch (0-based).
        step: step within the epoch (0-based).
        global_step: steps done before this one in the whole run.
        steps_per_epoch: steps of one epoch.
        epochs: epochs of the run.
        criterion: label-smoothed CE plus DeiT distillation from ``--teacher``; call it as
            ``criterion(inputs, outputs, targets) -> (loss, logs)``.
    """

    epoch: int
    step: int
    global_step: int
    steps_per_epoch: int
    epochs: int
    criterion: DistillationLoss

    @property
    def progress(self) -> float:
        """Fraction of the run done, in [0, 1] (for schedules of regularisers)."""
        return self.global_step / max(1, self.steps_per_epoch * self.epochs)


def _flag_type(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, is_bool, is_list) for a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0])
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (args[0] if args else str), False, True
    return tp, tp is bool, False


class TrainMethod:
    """Base of the training methods; the defaults train a float model.

    Subclasses set :attr:`name` and :attr:`Config`, register with
    ``@METHODS.register("<name>")`` and override the hooks they need.

    Args:
        config: the method's options (default: ``Config()``).
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: one line shown by ``vitquant train --help``
    summary: ClassVar[str] = ""

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    # --- CLI side ---------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser | Any) -> None:
        """Adds one ``--flag`` per field of :attr:`Config` (CLI side only).

        Flags default to ``argparse.SUPPRESS`` so that only the options a user gives appear;
        the dataclass holds the defaults. Several methods may declare the same flag (e.g.
        ``--wbits``) provided they agree on its type: the first declaration is used and the
        help lists every method's default. A field named like a core training option (``lr``)
        gets no flag.
        """
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            elem, is_bool, is_list = _flag_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = f"{cls.name}: {default}"
            existing = getattr(parser, "_option_string_actions", {}).get(flag)
            if existing is not None:  # declared by another method: add this default to its help
                if existing.help and existing.help.endswith(")"):
                    existing.help = f"{existing.help[:-1]}, {shown})"
                continue
            help_ = f"{f.metadata.get('help', '')} ({shown})".strip()
            kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
            if is_bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = elem if elem in (int, float) else str
                if is_list:
                    kwargs["nargs"] = "+"
                if "choices" in f.metadata:
                    kwargs["choices"] = list(f.metadata["choices"])
            try:
                parser.add_argument(flag, **kwargs)
            except argparse.ArgumentError:
                pass  # a core option of the same name: the method keeps its default
        return None

    @classmethod
    def option_names(cls) -> set[str]:
        """Names of this method's options (its config fields)."""
        return {f.name for f in dataclasses.fields(cls.Config)}

    @classmethod
    def config_from_dict(cls, values: dict[str, Any]) -> MethodConfig:
        """The method's config from ``{option: value}`` (missing options keep their default)."""
        return cls.Config.from_dict(values)

    # --- data -------------------------------------------------------------------------------
    def build_train_set(self, base: Dataset, num_classes: int, seed: int = 0) -> Dataset | None:
        """A training set of the method's own (e.g. VVTQ's multi-crop soft labels), or ``None``.

        Called by :func:`~vitquant.train.fit` before the model is prepared. ``base`` is the
        run's training split with the evaluation transform (no random augmentation), the same
        ``--train-subset`` in the same order; it is loaded only if the hook uses it. ``None``
        (the default) keeps the engine's augmented training set.
        """
        return None

    # --- model ------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Turns the float model into the one to train (insert quantizers, calibrate...).

        Called before the model moves to the device and before any checkpoint state is loaded;
        the returned model's ``state_dict`` is what checkpoints hold.
        """
        return model

    def teacher(self, ctx: MethodContext) -> nn.Module | None:
        """A teacher of the method's own (e.g. the float model); ``None``: the ``--teacher``."""
        return None

    # --- optimisation -----------------------------------------------------------------------
    def param_groups(
        self, model: nn.Module, base_lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        """Parameter groups of the main optimizer (a group may set its own ``lr``).

        Default: timm/DeiT groups (no decay for 1-d parameters and ``no_weight_decay()``).
        """
        return param_groups_weight_decay(model, weight_decay)

    def extra_optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        """Further optimizers stepped with the main one (e.g. DiffQ's Adam for bit logits).

        They follow the learning-rate schedule too (each group scaled from its ``initial_lr``),
        and their states are checkpointed.
        """
        return []

    def loss(
        self,
        outputs: Tensor | tuple[Tensor, Tensor],
        targets: Tensor,
        inputs: Tensor,
        state: StepState,
    ) -> tuple[Tensor, dict[str, float]]:
        """The training loss of one batch and floats to log. Default: ``state.criterion``."""
        return state.criterion(inputs, outputs, targets)

    def penalty(self, model: nn.Module) -> Tensor | None:
        """A regulariser added to the loss (e.g. DiffQ's model size × λ); ``None``: none."""
        return None

    def on_step_end(self, model: nn.Module, state: StepState) -> None:
        """Called after each optimizer step (e.g. oscillation tracking)."""
        return None

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Called after each epoch; the returned numbers are logged (e.g. size in MB)."""
        return {}

    # --- state ------------------------------------------------------------------------------
    def checkpoint_extra_state(self) -> dict[str, Any]:
        """State outside the model and optimizers to checkpoint (plain tensors/numbers)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`checkpoint_extra_state` returned."""
        return None

    # --- evaluation -------------------------------------------------------------------------
    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model to evaluate (e.g. with real instead of noisy quantization)."""
        return model


#: every registered method, by name (``@METHODS.register("lsq")``)
METHODS: Registry[type[TrainMethod]] = Registry("training method")

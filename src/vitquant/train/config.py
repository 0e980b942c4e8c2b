"""The resolved options of one training run: :class:`TrainConfig`.

A plain dataclass (DeiT's ``main.py`` arguments, Touvron et al., 2021, arXiv 2012.12877, made
explicit) that the CLI builds from its flags and ``--config`` recipe, that is saved as the
experiment's ``config.yaml``, and that the library reads; the library never sees an argparse
``Namespace``. Fields listed in :data:`RUNTIME_FIELDS` change how a run is executed but not its
result (workers, device, checkpoint cadence), so they neither name the experiment folder nor block
a resume when they differ.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from vitquant.errors import ConfigError

__all__ = ["format_value", "TrainConfig", "RUNTIME_FIELDS", "OPTIMIZERS", "DISTILLATION_TYPES"]

OPTIMIZERS = ("adamw", "sgd", "lamb")
#: ``dgd`` is an alias: it turns on the method's DGD loss (Q-ViT) and sets the DeiT type to none
DISTILLATION_TYPES = ("none", "soft", "hard", "dgd")

#: fields that do not change the result of a run (not in the folder name, free to change on resume)
RUNTIME_FIELDS = frozenset(
    {
        "num_workers",
        "device",
        "save_every_steps",
        "save_every_minutes",
        "log_every",
        "eval_batch_size",
        "output",
        "name",
        "version",
    }
)


def format_value(value: Any) -> str:
    """A value as it appears in a folder name (``0.001``, ``true``, ``a-b``, paths flattened)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value) if value != int(value) or abs(value) >= 1e16 else str(int(value))
    if isinstance(value, list | tuple):
        return "-".join(format_value(v) for v in value)
    text = str(value).rstrip("/")
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    Args:
        model: registered model name (``vitquant.list_models()``).
        data_path: dataset name (``"digits"``) or path (Fashion-MNIST IDX folder, image folder).
        train_split: split to train on.
        eval_split: split to evaluate on after each epoch.
        img_size: input resolution (``None``: the model's).
        train_subset: train on this many images only (0: all); the subset depends on ``seed``.
        eval_subset: evaluate on this many images only (0: all).
        epochs: number of epochs.
        batch_size: images per optimizer step and process.
        eval_batch_size: images per evaluation batch (0: twice ``batch_size``).
        opt: ``"adamw"``, ``"sgd"`` or ``"lamb"``.
        lr: peak learning rate (after warm-up).
        min_lr: learning rate at the end of the cosine.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        warmup_lr: learning rate at the first step.
        weight_decay: decoupled weight decay (AdamW, LAMB) or L2 (SGD); 1-d parameters, biases
            and the model's ``no_weight_decay()`` names get none.
        momentum: SGD momentum.
        betas: Adam/LAMB moment coefficients.
        eps: Adam/LAMB epsilon.
        clip_grad: maximal global gradient norm (0: no clipping).
        label_smoothing: label smoothing of the cross-entropy.
        drop_path: stochastic depth rate.
        amp: bf16 autocast; ``None``: on for CUDA, off on CPU.
        seed: seed of the initialisation, data order, augmentation and dropout.
        repeated_aug: DeiT's repeated augmentation sampler.
        augment: training augmentation of the data package: ``"default"`` (per dataset),
            ``"rrc"`` (random resized crop) or ``"none"``.
        method: training method (``vitquant.methods.METHODS``).
        method_args: the method's own options (its config dataclass as a dict).
        teacher: teacher for distillation: a model name, a vitquant checkpoint or run folder, or
            a checkpoint of ``teacher_model``.
        teacher_model: architecture of a foreign teacher checkpoint.
        distillation_type: ``"none"``, ``"soft"`` or ``"hard"`` (DeiT); ``"dgd"`` is an alias
            that sets the method option ``dgd`` (Q-ViT's distribution-guided distillation, method
            ``qvit``) and stores ``"none"`` (other methods: a ``ConfigError``).
        distillation_alpha: weight of the distillation term.
        distillation_tau: temperature of the soft distillation.
        finetune: float checkpoint to start from.
        eval_every: evaluate every this many epochs (the last epoch always).
        num_workers: data loader worker processes.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        save_every_steps: also checkpoint every this many steps inside an epoch (0: off).
        save_every_minutes: also checkpoint when this many minutes passed (0: off).
        log_every: log a line every this many steps when no progress bar is shown.
        output: root folder of the experiment folders.
        name: experiment folder name (default: made from the options that differ from defaults).
        version: version of this config's layout.
    """

    model: str = "vit_nano_patch4_28"
    data_path: str = "digits"
    train_split: str = "train"
    eval_split: str = "val"
    img_size: int | None = None
    train_subset: int = 0
    eval_subset: int = 0
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 0
    opt: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 0.0
    label_smoothing: float = 0.1
    drop_path: float = 0.0
    amp: bool | None = None
    seed: int = 0
    repeated_aug: bool = False
    augment: str = "default"
    method: str = "float"
    method_args: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    teacher_model: str | None = None
    distillation_type: str = "none"
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0
    finetune: str | None = None
    eval_every: int = 1
    num_workers: int = 0
    device: str = "auto"
    save_every_steps: int = 0
    save_every_minutes: float = 10.0
    log_every: int = 50
    output: str = "runs"
    name: str | None = None
    version: int = 1

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.method_args = dict(self.method_args or {})
        if self.distillation_type == "dgd":
            self._resolve_dgd_alias()
        checks = [
            (bool(self.model), "model must be given"),
            (bool(self.data_path), "data_path must be given"),
            (self.opt in OPTIMIZERS, f"opt must be one of {', '.join(OPTIMIZERS)}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.eval_batch_size >= 0, "eval_batch_size must be >= 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.min_lr >= 0 and self.warmup_lr >= 0, "min_lr and warmup_lr must be >= 0"),
            (0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must be in [0, epochs]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (all(0 <= b < 1 for b in self.betas), "betas must be in [0, 1)"),
            (self.clip_grad >= 0, "clip_grad must be >= 0 (0: off)"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 <= self.drop_path < 1, "drop_path must be in [0, 1)"),
            (self.train_subset >= 0 and self.eval_subset >= 0, "subsets must be >= 0"),
            (
                self.distillation_type in DISTILLATION_TYPES,
                f"distillation_type must be one of {', '.join(DISTILLATION_TYPES)}",
            ),
            (0 <= self.distillation_alpha <= 1, "distillation_alpha must be in [0, 1]"),
            (self.distillation_tau > 0, "distillation_tau must be > 0"),
            (
                self.distillation_type == "none" or bool(self.teacher),
                f"distillation_type {self.distillation_type!r} needs a --teacher",
            ),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.augment in ("default", "rrc", "none"), "augment must be default, rrc or none"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.save_every_steps >= 0, "save_every_steps must be >= 0"),
            (self.save_every_minutes >= 0, "save_every_minutes must be >= 0"),
            (self.log_every >= 1, "log_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def _resolve_dgd_alias(self) -> None:
        """``distillation_type="dgd"``: the method's ``dgd`` option on, DeiT distillation off."""
        from vitquant.methods import get_method

        cls = get_method(self.method)
        if "dgd" not in cls.option_names():
            with_dgd = ", ".join(
                n for n in _method_names() if "dgd" in get_method(n).option_names()
            )
            raise ConfigError(
                f"--distillation-type dgd needs a method with a DGD loss ({with_dgd}), not "
                f"{self.method!r}; use soft or hard with --teacher"
            )
        if self.method_args.get("dgd") is False:
            raise ConfigError("--distillation-type dgd contradicts --no-dgd")
        self.method_args["dgd"] = True
        self.distillation_type = "none"

    def differences(self, other: TrainConfig) -> list[str]:
        """``key=<mine> (folder) vs <other's> (now)`` for each result-changing field that differs.

        Method options are compared one by one (``method_args.wbits=4 (folder) vs 3 (now)``), an
        option left out being equal to the method's default.
        """
        old, new = self.semantic_dict(), other.semantic_dict()
        old_m, new_m = old.pop("method_args", {}) or {}, new.pop("method_args", {}) or {}
        if self.method == other.method:  # options left at their default are equal to them
            defaults = _method_defaults(self.method)
            old_m, new_m = {**defaults, **old_m}, {**defaults, **new_m}
        pairs = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))]
        pairs += [
            (f"method_args.{k}", old_m.get(k), new_m.get(k))
            for k in sorted(set(old_m) | set(new_m))
        ]
        return [
            f"{k}={format_value(a)} (folder) vs {format_value(b)} (now)"
            for k, a, b in pairs
            if a != b
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-safe: tuples become lists)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Builds a config from a dict; unknown keys raise a ``ConfigError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def semantic_dict(self) -> dict[str, Any]:
        """The fields that define the result of the run (all but :data:`RUNTIME_FIELDS`)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


def _method_names() -> list[str]:
    from vitquant.methods import METHODS

    return list(METHODS.names())


def _method_defaults(name: str) -> dict[str, Any]:
    from vitquant.methods import get_method

    try:
        return get_method(name).Config().to_dict()
    except ConfigError:
        return {}

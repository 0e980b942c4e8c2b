"""The ``vvtq`` method: VVTQ, QAT that tames quantization variation.

Huang et al., "Quantization Variation: A New Perspective on Training Transformers with Low-Bit
Precision" (TMLR 2024, arXiv 2307.00331):

* module-dependent quantization: separate q/k/v projections with their own steps
  (:mod:`vitquant.methods.vvtq.split_attention`), LSQ activations, LSQ+ (unsigned, learnable
  offset) after
  GELU, patch embedding and head at 8 bits, ``--head-wise`` per-head scales for q, k, v and
  attention;
* multi-crop soft-label distillation (FKD) from ``--softlabel-path`` with ``--num-crops`` crops
  per image (:mod:`vitquant.methods.vvtq.softlabels`; make the folder with ``vitquant softlabels``);
* the bin regulariser with its cosine schedule (``--reg``, zero for the first quarter, then up
  to ``--reg-max``);
* oscillation tracking that really freezes oscillating weights (``--freeze``); the fraction of
  oscillating and frozen weights is logged per epoch (``osc_pct``, ``frozen_pct``), next to the
  threshold-free fraction of weights whose integer code reversed direction during the epoch
  (``flip_pct``, ``flip2_pct`` for twice or more; ``change_pct``: code changed at all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from vitquant.errors import ConfigError
from vitquant.methods.base import METHODS, MethodContext, StepState
from vitquant.methods.qat.method import QATMethod, QATMethodConfig
from vitquant.methods.qat.quantize import QATScheme
from vitquant.methods.vvtq.losses import CosineRampSchedule, soft_cross_entropy
from vitquant.methods.vvtq.quantizer import VVTQQuantizer

__all__ = ["VVTQConfig", "VVTQMethod", "oscillation_stats"]


@dataclass
class VVTQConfig(QATMethodConfig):
    """VVTQ's options."""

    reg: bool = field(default=False, metadata={"help": "bin regulariser with a cosine schedule"})
    reg_max: float = field(default=0.01, metadata={"help": "final weight of the regulariser"})
    reg_start: float = field(
        default=0.25, metadata={"help": "fraction of training before the regulariser starts"}
    )
    track_osc: bool = field(default=True, metadata={"help": "track weight oscillations"})
    freeze: bool = field(default=True, metadata={"help": "freeze oscillating weights"})
    osc_momentum: float = field(default=0.01, metadata={"help": "EMA momentum of oscillations"})
    osc_threshold: float = field(
        default=0.1, metadata={"help": "oscillation frequency above which a weight freezes"}
    )
    head_wise: bool = field(default=False, metadata={"help": "per-head q/k/v/attention steps"})
    softlabel_path: str | None = field(
        default=None, metadata={"help": "FKD soft-label folder (vitquant softlabels)"}
    )
    num_crops: int = field(default=4, metadata={"help": "recorded crops used per image and step"})
    softlabel_type: str = field(
        default="marginal", metadata={"help": "marginal (FKD smoothing), renorm or hard"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reg_max < 0:
            raise ConfigError("reg_max must be >= 0")
        if not 0 <= self.reg_start < 1:
            raise ConfigError("reg_start must be in [0, 1)")
        if self.num_crops < 1:
            raise ConfigError("num_crops must be >= 1")


def oscillation_stats(model: nn.Module, reset: bool = False) -> dict[str, float]:
    """Percentages of oscillating, frozen and flipping weights over all VVTQ weight quantizers.

    Args:
        model: a model prepared by the ``vvtq`` method.
        reset: start a new window of flip counts afterwards (at the end of an epoch).

    Returns:
        ``osc_pct`` (EMA frequency above the threshold now), ``frozen_pct``, and over the window
        since the last reset: ``flip_pct`` (weights whose integer code reversed direction at least
        once), ``flip2_pct`` (at least twice) and ``change_pct`` (code changed at all); empty
        when the model has no VVTQ quantizer.
    """
    osc = frozen = total = flips = flips2 = changed = 0
    for m in model.modules():
        if isinstance(m, VVTQQuantizer):
            tr = m.oscillation
            o, f, t = tr.counts()
            fl, ch, _ = tr.window_counts(1)
            fl2, _, _ = tr.window_counts(2)
            osc, frozen, total = osc + o, frozen + f, total + t
            flips, flips2, changed = flips + fl, flips2 + fl2, changed + ch
            if reset:
                tr.reset_window()
    if total == 0:
        return {}
    return {
        "osc_pct": 100.0 * osc / total,
        "frozen_pct": 100.0 * frozen / total,
        "flip_pct": 100.0 * flips / total,
        "flip2_pct": 100.0 * flips2 / total,
        "change_pct": 100.0 * changed / total,
    }


def _flatten_crops(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if isinstance(x, Tensor) and x.dim() == 5:
        return (x.flatten(0, 1), *args[1:])
    return None


@METHODS.register("vvtq")
class VVTQMethod(QATMethod):
    """VVTQ quantization-aware training (``--reg``, ``--freeze``, ``--softlabel-path``)."""

    name = "vvtq"
    Config = VVTQConfig
    summary = "VVTQ: split q/k/v, soft-label multi-crop KD, bin regulariser, oscillation freezing"

    def __init__(self, config: VVTQConfig | None = None) -> None:
        super().__init__(config)
        self._schedule: CosineRampSchedule | None = None
        self._quantizers: list[VVTQQuantizer] = []

    def scheme(self, wbits: int, abits: int) -> QATScheme:
        c: VVTQConfig = self.config  # type: ignore[assignment]
        return QATScheme(
            wbits,
            abits,
            weight_quantizer="vvtq",
            weight_granularity=c.weight_granularity,
            attn_granularity="head" if c.head_wise else "tensor",
            split_qkv=True,
        )

    # --- data -------------------------------------------------------------------------------
    def build_train_set(self, base: Dataset, num_classes: int, seed: int = 0) -> Dataset | None:
        """The multi-crop soft-label training set over ``base`` (un-augmented), or None.

        ``base`` must be the training split with the evaluation transform (no random crop),
        in the order the soft labels were made.
        """
        c: VVTQConfig = self.config  # type: ignore[assignment]
        if not c.softlabel_path:
            return None
        from vitquant.methods.vvtq.softlabels import MultiCropSoftLabelDataset

        return MultiCropSoftLabelDataset(
            base, c.softlabel_path, c.num_crops, num_classes, c.softlabel_type, seed
        )

    # --- hooks ------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        c: VVTQConfig = self.config  # type: ignore[assignment]
        if c.softlabel_path and ctx.config.distillation_type != "none":
            raise ConfigError(
                "--softlabel-path already distils from the teacher that wrote the soft labels: "
                f"drop --distillation-type {ctx.config.distillation_type} (or the soft labels)"
            )
        if c.softlabel_path:
            model.register_forward_pre_hook(_flatten_crops)
        model = super().prepare_model(model, ctx)
        self._quantizers = [m for m in model.modules() if isinstance(m, VVTQQuantizer)]
        for q in self._quantizers:
            q.track = c.track_osc
            q.oscillation.momentum = c.osc_momentum
            q.oscillation.threshold = c.osc_threshold
            q.oscillation.freeze = c.freeze
        if c.reg:
            total = max(1, ctx.config.epochs)
            self._schedule = CosineRampSchedule(total, 0.0, c.reg_max, c.reg_start)
        return model

    def loss(
        self,
        outputs: Tensor | tuple[Tensor, Tensor],
        targets: Tensor,
        inputs: Tensor,
        state: StepState,
    ) -> tuple[Tensor, dict[str, float]]:
        if self._schedule is not None:
            lam = self._schedule(state.progress * state.epochs)
            for q in self._quantizers:
                q.reg_weight = lam
        if targets.is_floating_point() and targets.dim() >= 2:
            logits = outputs if isinstance(outputs, Tensor) else (outputs[0] + outputs[1]) / 2
            soft = targets.reshape(-1, targets.shape[-1])
            if logits.shape != soft.shape:
                raise ConfigError(
                    f"soft labels have {soft.shape[-1]} classes, the model {logits.shape[-1]}"
                )
            loss = soft_cross_entropy(logits.float(), soft)
            return loss, {"soft_ce": float(loss.detach())}
        return state.criterion(inputs, outputs, targets)

    def penalty(self, model: nn.Module) -> Tensor | None:
        total: Tensor | None = None
        for q in self._quantizers:
            p = q.penalty()
            if p is not None:
                total = p if total is None else total + p
        return total

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        return oscillation_stats(model, reset=True)

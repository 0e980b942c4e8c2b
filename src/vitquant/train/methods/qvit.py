"""The ``qvit`` method: Q-ViT, fully quantized low-bit ViTs with IRM and DGD.

Li et al., "Q-ViT: Accurate and Fully Quantized Low-bit Vision Transformer" (NeurIPS 2022,
arXiv 2210.06707):

* Q-ViT's LSQ-style quantizers with learnable zero points, per input feature on Linear inputs and
  per head on q, k, v and the attention probabilities; patch embedding and head(s) at 8 bits;
* the information rectification module on q and k (``--irm``, :mod:`vitquant.qat.irm`), with
  statistics per channel (``--irm-stats channel``: starts as the float function) or per token as
  the released code's LayerNorm (``--irm-stats token``);
* distribution-guided distillation (``--dgd``): the row-normalised q·qᵀ and k·kᵀ of every layer
  and head of the quantized student are matched to those of a float teacher
  (:func:`vitquant.train.losses_qat.dgd_loss`), added to the engine's loss (CE plus DeiT soft or
  hard distillation from ``--teacher``). The original code never shipped DGD.

The DGD teacher is ``--teacher`` when given, else a frozen copy of the float model the run starts
from (``--finetune``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...qat.capture import QKCapture
from ...qat.irm import IRM_STATS, check_irm_stats
from ...qat.method import QATMethod, QATMethodConfig
from ...qat.quantize import QATScheme
from ..losses_qat import dgd_loss
from . import METHODS
from .base import MethodContext, StepState

__all__ = ["QViTConfig", "QViTMethod"]


@dataclass
class QViTConfig(QATMethodConfig):
    """Q-ViT's options."""

    irm: bool = field(default=True, metadata={"help": "information rectification on q and k"})
    irm_stats: str = field(
        default="channel",
        metadata={
            "help": "IRM's mean and std: per head and channel from calibration (channel) or "
            "per token as the released code's LayerNorm (token)",
            "choices": IRM_STATS,
        },
    )
    dgd: bool = field(default=True, metadata={"help": "distribution-guided distillation"})
    dgd_weight: float = field(default=1.0, metadata={"help": "weight of the DGD loss"})
    dgd_sum: bool = field(
        default=False,
        metadata={"help": "sum DGD over layers and heads as the paper (default: their mean)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dgd_weight < 0:
            from ...errors import ConfigError

            raise ConfigError("dgd_weight must be >= 0")
        check_irm_stats(self.irm_stats)


def _patch_tokens(pairs: list[tuple[Tensor, Tensor]], n: int) -> list[tuple[Tensor, Tensor]]:
    return [(q[..., -n:, :], k[..., -n:, :]) for q, k in pairs]


@METHODS.register("qvit")
class QViTMethod(QATMethod):
    """Q-ViT quantization-aware training (``--irm``, ``--dgd``)."""

    name = "qvit"
    Config = QViTConfig
    summary = "Q-ViT: per-head quantizers, information rectification (IRM) and DGD distillation"

    def __init__(self, config: QViTConfig | None = None) -> None:
        super().__init__(config)
        self.wants_float_teacher = bool(self.config.dgd)  # type: ignore[attr-defined]
        self._student_cap: QKCapture | None = None
        self._teacher_cap: QKCapture | None = None
        self._teacher_id: int | None = None

    def scheme(self, wbits: int, abits: int) -> QATScheme:
        c: QViTConfig = self.config  # type: ignore[assignment]
        return QATScheme(
            wbits,
            abits,
            weight_granularity=c.weight_granularity,
            input_quantizer="qvit",
            input_granularity="channel",
            attn_quantizer="qvit",
            attn_granularity="head",
            irm=c.irm,
            irm_stats=c.irm_stats,
        )

    def prepare_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        model = super().prepare_model(model, ctx)
        if self.config.dgd:  # type: ignore[attr-defined]
            self._student_cap = QKCapture(model)
        return model

    def _teacher_pairs(self, teacher: nn.Module, inputs: Tensor, ran: bool) -> list[Any]:
        if self._teacher_cap is None or self._teacher_id != id(teacher):
            if self._teacher_cap is not None:
                self._teacher_cap.remove()
            self._teacher_cap = QKCapture(teacher, detach=True)
            self._teacher_id = id(teacher)
            ran = False
        if not ran:
            with torch.no_grad():
                teacher(inputs)
        return self._teacher_cap.pop()

    def loss(
        self,
        outputs: Tensor | tuple[Tensor, Tensor],
        targets: Tensor,
        inputs: Tensor,
        state: StepState,
    ) -> tuple[Tensor, dict[str, float]]:
        crit = state.criterion
        first_time = self._teacher_cap is None
        loss, logs = crit(inputs, outputs, targets)
        if not self.config.dgd or self._student_cap is None:  # type: ignore[attr-defined]
            return loss, logs
        teacher = crit.teacher
        if teacher is None:
            from ...errors import ConfigError

            raise ConfigError("DGD needs a teacher: give --teacher or --finetune a float model")
        ran = crit.distillation_type != "none" and not first_time
        t_pairs = self._teacher_pairs(teacher, inputs, ran)
        s_pairs = self._student_cap.pop()
        n = min(s_pairs[0][0].shape[-2], t_pairs[0][0].shape[-2])
        d = dgd_loss(
            _patch_tokens(s_pairs, n),
            _patch_tokens(t_pairs, n),
            average_terms=not self.config.dgd_sum,  # type: ignore[attr-defined]
        )
        weight = float(self.config.dgd_weight)  # type: ignore[attr-defined]
        return loss + weight * d, {**logs, "dgd": float(d.detach())}

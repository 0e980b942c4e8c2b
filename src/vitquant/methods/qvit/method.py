"""The ``qvit`` method: Q-ViT, fully quantized low-bit ViTs with IRM and DGD.

Li et al., "Q-ViT: Accurate and Fully Quantized Low-bit Vision Transformer" (NeurIPS 2022,
arXiv 2210.06707):

* Q-ViT's LSQ-style quantizers with learnable zero points, per input feature on Linear inputs and
  per head on q, k, v and the attention probabilities; patch embedding and head(s) at 8 bits;
* the information rectification module on q and k (``--irm``, :mod:`vitquant.methods.qvit.irm`):
  ``--irm-stats channel`` (default) a learnable per-channel affine with statistics fixed at
  calibration (starts as the float function, folds into the q/k projection), ``dynamic`` the
  paper's re-normalisation by the statistics of the current q/k in every forward, or ``token``
  the released code's LayerNorm per token;
* distribution-guided distillation (``--dgd``): the row-normalised q·qᵀ and k·kᵀ of every layer
  and head of the quantized student are matched to those of a float teacher
  (:func:`vitquant.methods.qvit.losses.dgd_loss`), added to the engine's loss (CE plus DeiT soft or
  hard distillation from ``--teacher``). The original code never shipped DGD. Each model's own
  prefix tokens are accounted for (:func:`align_dgd_tokens`): with a distilled DeiT teacher
  (``[cls, dist, patches]``) and a plain student (``[cls, patches]``) the class tokens are
  compared with each other, the patches with the patches, and the distillation token not at all
  (two distilled models, as Q-ViT's recipes, also compare their distillation tokens).

The DGD teacher is ``--teacher`` when given, else a frozen copy of the float model the run starts
from (``--finetune``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.methods.base import METHODS, MethodContext, StepState
from vitquant.methods.qat.method import QATMethod, QATMethodConfig
from vitquant.methods.qat.quantize import QATScheme
from vitquant.methods.qvit.capture import NAMED_PREFIX_TOKENS, QKCapture, dgd_tokens
from vitquant.methods.qvit.irm import IRM_STATS, check_irm_stats
from vitquant.methods.qvit.losses import dgd_loss

__all__ = ["QViTConfig", "QViTMethod", "align_dgd_tokens"]


@dataclass
class QViTConfig(QATMethodConfig):
    """Q-ViT's options."""

    irm: bool = field(default=True, metadata={"help": "information rectification on q and k"})
    irm_stats: str = field(
        default="channel",
        metadata={
            "help": "IRM's mean and std: channel = per head and channel, fixed at calibration "
            "(a learnable affine that folds into qkv); dynamic = the paper's IRM, from the "
            "current q/k of each image in every forward (cannot fold); token = per token, as "
            "the released code's LayerNorm",
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
            raise ConfigError("dgd_weight must be >= 0")
        check_irm_stats(self.irm_stats)


Pairs = list[tuple[Tensor, Tensor]]


def align_dgd_tokens(
    student: Pairs, s_prefix: tuple[str, ...], teacher: Pairs, t_prefix: tuple[str, ...]
) -> tuple[Pairs, Pairs]:
    """The student's and teacher's ``(q, k)`` per layer on the tokens DGD compares.

    Each side keeps, of its own prefix tokens
    (:func:`~vitquant.methods.qvit.capture.prefix_tokens`), the
    class and distillation tokens that the other model has too (class token against class token,
    distillation token against distillation token, never one against the other), then all its
    patch tokens. A distilled teacher and a plain student compare ``[cls, patches]``; two
    distilled models ``[cls, dist, patches]``; two plain ones ``[cls, patches]``.

    Raises:
        ConfigError: the two models have different numbers of patch tokens.
    """
    n_s = student[0][0].shape[-2] - len(s_prefix)
    n_t = teacher[0][0].shape[-2] - len(t_prefix)
    if n_s != n_t:
        raise ConfigError(
            f"DGD needs the same patch tokens in student ({n_s}) and teacher ({n_t}): give the "
            "teacher the student's image and patch size"
        )
    shared = tuple(t for t in NAMED_PREFIX_TOKENS if t in s_prefix and t in t_prefix)

    def keep(pairs: Pairs, prefix: tuple[str, ...]) -> Pairs:
        return [(dgd_tokens(q, prefix, shared), dgd_tokens(k, prefix, shared)) for q, k in pairs]

    return keep(student, s_prefix), keep(teacher, t_prefix)


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

    def _teacher_pairs(self, teacher: nn.Module, inputs: Tensor, ran: bool) -> Pairs:
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
            raise ConfigError("DGD needs a teacher: give --teacher or --finetune a float model")
        ran = crit.distillation_type != "none" and not first_time
        t_pairs = self._teacher_pairs(teacher, inputs, ran)
        s_pairs = self._student_cap.pop()
        assert self._teacher_cap is not None
        s_pairs, t_pairs = align_dgd_tokens(
            s_pairs, self._student_cap.prefix, t_pairs, self._teacher_cap.prefix
        )
        d = dgd_loss(
            s_pairs,
            t_pairs,
            average_terms=not self.config.dgd_sum,  # type: ignore[attr-defined]
        )
        weight = float(self.config.dgd_weight)  # type: ignore[attr-defined]
        return loss + weight * d, {**logs, "dgd": float(d.detach())}

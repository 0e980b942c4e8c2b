"""The ``ft-qat`` method: FasterTransformer's QAT of a calibrated ViT with distillation.

NVIDIA FasterTransformer ``examples/pytorch/vit/ViT-quantization`` (``main.py --train``): the
student is the PTQ-calibrated model with fixed ranges (pytorch-quantization ``TensorQuantizer``,
``learn_amax=False``): only the weights train, through the straight-through estimator. The loss is
``CE(s, y) + λ·KLDivLoss(log_softmax(s/T), softmax(t/T))`` with torch's element-mean reduction and
no ``T²`` (the seed's λ = 10000, T = 3), the teacher being the float model; the seed trains with
SGD (momentum 0.9, no weight decay, gradient clipping 1.0, constant learning rate).

With ``--distillation-type soft|hard`` (and ``--teacher``) the loss is instead DeiT's, with
``--distillation-alpha`` / ``--distillation-tau``, as for every other method.

The calibrated start point is either a file of ``vitquant calibrate`` (``--calibrated``) or made
here from the float model (``--finetune``) with the preset (``--preset``, default ``ft2``) and the
calibrator (``--calibrator``, default percentile 99.99). The KL teacher is a frozen copy of that
float model; a resumed run gets the same one (and the same calibration, which its checkpoint then
replaces), since :func:`~vitquant.train.trainer.fit` loads ``--finetune`` before
``prepare_model`` also when resuming.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.errors import CheckpointError, ConfigError
from vitquant.methods.base import METHODS, MethodConfig, MethodContext, StepState, TrainMethod
from vitquant.methods.ft_qat.losses import kl_distillation
from vitquant.quant import QuantConfig, calibrate, named_quantizers, prepare
from vitquant.quant.primitives import check_bits

__all__ = ["FTQATConfig", "FTQATMethod"]


@dataclass
class FTQATConfig(MethodConfig):
    """FasterTransformer QAT options."""

    wbits: int = field(default=8, metadata={"help": "weight bits 2..8"})
    abits: int = field(default=8, metadata={"help": "activation bits 2..8"})
    preset: str = field(default="ft2", metadata={"help": "quantization mode: ft1, ft2, ft3, trt"})
    calibrator: str = field(
        default="percentile", metadata={"help": "max, percentile, mse or entropy"}
    )
    percentile: float = field(default=99.99, metadata={"help": "percentile of the calibrator"})
    calib_batches: int = field(default=10, metadata={"help": "calibration batches"})
    calibrated: str | None = field(
        default=None, metadata={"help": "calibrated model file (vitquant calibrate) to start from"}
    )
    kd_weight: float = field(default=10000.0, metadata={"help": "λ of the KL term (seed: 10000)"})
    kd_tau: float = field(default=3.0, metadata={"help": "temperature of the KL term (seed: 3)"})

    def __post_init__(self) -> None:
        self.wbits = check_bits(self.wbits, 2, 8, "wbits")
        self.abits = check_bits(self.abits, 2, 8, "abits")
        if self.kd_weight < 0 or self.kd_tau <= 0:
            raise ConfigError("kd_weight must be >= 0 and kd_tau > 0")
        if self.calib_batches < 1:
            raise ConfigError("calib_batches must be >= 1")


@METHODS.register("ft-qat")
class FTQATMethod(TrainMethod):
    """QAT of a calibrated model with fixed ranges and KL distillation (FasterTransformer)."""

    name = "ft-qat"
    Config = FTQATConfig
    summary = (
        "FasterTransformer QAT: calibrated fixed ranges, CE + 10000·KL(T=3) to the float model"
    )

    def __init__(self, config: FTQATConfig | None = None) -> None:
        super().__init__(config)
        self._teacher: nn.Module | None = None

    def prepare_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        c: FTQATConfig = self.config  # type: ignore[assignment]
        if not ctx.config.teacher:
            self._teacher = copy.deepcopy(model).eval()
            for p in self._teacher.parameters():
                p.requires_grad_(False)
        if c.calibrated:
            from vitquant.quant import load_calibrated

            student = load_calibrated(c.calibrated)
            float_keys = set(model.state_dict())
            if not float_keys <= set(student.state_dict()):
                raise CheckpointError(
                    f"--calibrated {c.calibrated} is not a calibrated {ctx.config.model}"
                )
            student.train()
            return student
        qcfg = QuantConfig(
            preset=c.preset,
            wbits=c.wbits,
            abits=c.abits,
            calibrator=c.calibrator,
            percentile=c.percentile,
        )
        prepare(model, qcfg)
        if ctx.calib_loader is None:
            raise ConfigError("ft-qat needs training batches to calibrate")
        calibrate(model, ctx.calib_loader, num_batches=c.calib_batches, progress=False)
        for _, q in named_quantizers(model):
            for p in q.parameters(recurse=False):
                p.requires_grad_(False)  # fixed ranges
        return model

    def teacher(self, ctx: MethodContext) -> nn.Module | None:
        return self._teacher.to(ctx.device) if self._teacher is not None else None

    def loss(
        self,
        outputs: Tensor | tuple[Tensor, Tensor],
        targets: Tensor,
        inputs: Tensor,
        state: StepState,
    ) -> tuple[Tensor, dict[str, float]]:
        c: FTQATConfig = self.config  # type: ignore[assignment]
        crit = state.criterion
        if crit.distillation_type != "none":  # --distillation-type soft/hard: DeiT's loss
            return crit(inputs, outputs, targets)
        logits = outputs if isinstance(outputs, Tensor) else (outputs[0] + outputs[1]) / 2
        ce = F.cross_entropy(logits.float(), targets)
        if crit.teacher is None or c.kd_weight == 0:
            return ce, {"ce": float(ce.detach())}
        t = crit.teacher_logits(inputs)
        kd = kl_distillation(logits.float(), t.float(), c.kd_tau, "mean", tau_squared=False)
        return ce + c.kd_weight * kd, {"ce": float(ce.detach()), "kd": float(kd.detach())}

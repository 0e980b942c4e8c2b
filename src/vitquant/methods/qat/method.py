"""The shared training-method machinery of LSQ, Q-ViT and VVTQ (:class:`QATMethod`).

Each QAT method is a :class:`~vitquant.methods.base.TrainMethod` (one file per method in
``vitquant/methods/``) on top of this base, which:

* turns the float model into the method's quantized model (:func:`~.quantize.build_qat_model`)
  and initialises the step sizes from a few training batches (always, also when resuming, so that
  the parameter shapes exist before data-parallel wrapping; the checkpoint then overwrites them);
* keeps a frozen copy of the float model as the teacher when the method needs one and no
  ``--teacher`` is given (the same on resume: :func:`~vitquant.train.trainer.fit` loads the
  ``--finetune`` weights before ``prepare_model`` also when resuming);
* puts the quantizers' steps/offsets and the IRM parameters in a group without weight decay, with
  the learning rate scaled by ``quant_lr_scale``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitquant.errors import ConfigError
from vitquant.methods.base import MethodConfig, MethodContext, TrainMethod
from vitquant.methods.qat.quantize import (
    INIT_METHODS,
    QATModule,
    QATScheme,
    build_qat_model,
    init_qat,
)
from vitquant.quant.primitives import check_bits

__all__ = ["QATMethodConfig", "QATMethod", "model_bits_hint"]


@dataclass
class QATMethodConfig(MethodConfig):
    """Options shared by the QAT methods."""

    wbits: int | None = field(
        default=None, metadata={"help": "weight bits 2..8 (default: the model name's, else 4)"}
    )
    abits: int | None = field(
        default=None,
        metadata={"help": "activation bits 2..8 (default: the model name's, else 4)"},
    )
    init: str = field(
        default="mse", metadata={"help": "step-size initialisation: mse, lsq, max, percentile"}
    )
    calib_batches: int = field(
        default=4, metadata={"help": "training batches used to initialise the step sizes"}
    )
    weight_granularity: str = field(
        default="channel", metadata={"help": "weight steps per channel or per tensor"}
    )
    quant_lr_scale: float = field(
        default=1.0, metadata={"help": "learning-rate factor of the steps/offsets (and IRM)"}
    )

    def __post_init__(self) -> None:
        if self.wbits is not None:
            self.wbits = check_bits(self.wbits, 2, 8, "wbits")
        if self.abits is not None:
            self.abits = check_bits(self.abits, 2, 8, "abits")
        if self.init not in INIT_METHODS:
            raise ConfigError(f"init must be one of {', '.join(INIT_METHODS)}, not {self.init!r}")
        if self.calib_batches < 1:
            raise ConfigError("calib_batches must be >= 1")
        if self.quant_lr_scale <= 0:
            raise ConfigError("quant_lr_scale must be > 0")


def model_bits_hint(model: nn.Module) -> int | None:
    """Bits named by a Q-ViT model name (``fourbits_...``), from its ``default_cfg``."""
    cfg = getattr(model, "default_cfg", None) or {}
    bits = cfg.get("qat_bits")
    return int(bits) if bits is not None else None


class QATMethod(TrainMethod):
    """Base of the LSQ / Q-ViT / VVTQ methods (not registered itself)."""

    Config = QATMethodConfig
    #: keep a float copy of the model as teacher when no ``--teacher`` is given
    wants_float_teacher = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self._float_copy: nn.Module | None = None

    # --- scheme -----------------------------------------------------------------------------
    def scheme(self, wbits: int, abits: int) -> QATScheme:
        """The method's quantizer placement (subclasses override)."""
        c = self.config
        return QATScheme(wbits, abits, weight_granularity=c.weight_granularity)  # type: ignore[attr-defined]

    def resolve_bits(self, model: nn.Module) -> tuple[int, int]:
        """``(wbits, abits)`` from the options, else the model name, else 4."""
        c = self.config
        hint = model_bits_hint(model)
        wbits = c.wbits if c.wbits is not None else (hint or 4)  # type: ignore[attr-defined]
        abits = c.abits if c.abits is not None else (hint or 4)  # type: ignore[attr-defined]
        return wbits, abits

    # --- hooks ------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        if self.wants_float_teacher and not ctx.config.teacher:
            self._float_copy = copy.deepcopy(model).eval()
            for p in self._float_copy.parameters():
                p.requires_grad_(False)
        wbits, abits = self.resolve_bits(model)
        model = build_qat_model(model, self.scheme(wbits, abits))
        if ctx.calib_loader is None:
            raise ConfigError(f"method {self.name} needs training batches to initialise its steps")
        init_qat(
            model,
            ctx.calib_loader,
            num_batches=self.config.calib_batches,  # type: ignore[attr-defined]
            method=self.config.init,  # type: ignore[attr-defined]
        )
        return model

    def teacher(self, ctx: MethodContext) -> nn.Module | None:
        if self._float_copy is None:
            return None
        return self._float_copy.to(ctx.device)

    def param_groups(
        self, model: nn.Module, base_lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        from vitquant.methods.base import param_groups_weight_decay
        from vitquant.quant.quantizers import Quantizer

        quant_ids: set[int] = set()
        quant_params: list[torch.Tensor] = []
        for m in model.modules():
            if isinstance(m, (Quantizer, QATModule)):
                for p in m.parameters(recurse=False):
                    if p.requires_grad and id(p) not in quant_ids:
                        quant_ids.add(id(p))
                        quant_params.append(p)
        groups = []
        for g in param_groups_weight_decay(model, weight_decay):
            kept = [p for p in g["params"] if id(p) not in quant_ids]
            if kept:
                groups.append({**g, "params": kept})
        if quant_params:
            scale = float(self.config.quant_lr_scale)  # type: ignore[attr-defined]
            groups.append({"params": quant_params, "weight_decay": 0.0, "lr": base_lr * scale})
        return groups

"""The ``diffq`` training method: DiffQ, and the fixed-bit QAT / LSQ baselines of its paper.

Défossez, Adi and Synnaeve (2021), "Differentiable Model Compression via Pseudo Quantization
Noise", arXiv 2104.09987, run as its fairseq and DeiT examples run it:

* ``--penalty P --group-size G``: DiffQ (:class:`vitquant.methods.diffq.DiffQuantizer`); the loss
gets
  ``P * model_size()`` (MB) and the bit logits train with their own Adam (``--bits-lr``, no weight
  decay), which follows the learning-rate schedule;
* ``--bits B``: the QAT baseline (:class:`~vitquant.methods.diffq.UniformQuantizer` with
  ``qat=True``, straight-through min-max quantization);
* ``--bits B --lsq``: the LSQ baseline (:class:`~vitquant.methods.diffq.LSQ`), steps in the main
  optimizer with its learning rate, as in LSQ.

Quantization covers the model's parameters (weights only), selected as DiffQ does (``--min-size``
MB, ``--exclude`` patterns). Evaluation runs the truly quantized weights; every epoch logs the true
model size (``model_size_mb``), the float size, the compression ratio and the average bits.
The bit logits and LSQ steps are model parameters, so checkpoints and resuming carry them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.methods.base import METHODS, MethodConfig, MethodContext, TrainMethod
from vitquant.methods.diffq.base import BaseQuantizer
from vitquant.methods.diffq.diffq import DiffQuantizer
from vitquant.methods.diffq.lsq import LSQ
from vitquant.methods.diffq.uniform import UniformQuantizer

__all__ = ["DiffQMethod", "DiffQMethodConfig", "quantizer_of"]

_ATTR = "_vitquant_diffq"


@dataclass
class DiffQMethodConfig(MethodConfig):
    """Options of the ``diffq`` method (fairseq ``run.py``: ``-p``, ``-g``, ``-b``, ``--lsq``)."""

    penalty: float = field(default=0.0, metadata={"help": "DiffQ: weight of the size in MB"})
    group_size: int = field(default=8, metadata={"help": "DiffQ: weights per bit width"})
    bits: int = field(default=0, metadata={"help": "fixed bits: QAT baseline (or LSQ with --lsq)"})
    lsq: bool = field(default=False, metadata={"help": "LSQ instead of min-max QAT with --bits"})
    min_bits: float = field(default=2.0, metadata={"help": "DiffQ: lowest bit width"})
    max_bits: float = field(default=15.0, metadata={"help": "DiffQ: highest bit width"})
    init_bits: float = field(default=8.0, metadata={"help": "DiffQ: initial bit width"})
    bits_lr: float = field(default=1e-3, metadata={"help": "DiffQ: Adam lr of the bit logits"})
    min_size: float = field(default=0.01, metadata={"help": "parameters of <= this many MB stay"})
    exclude: list[str] = field(
        default_factory=list, metadata={"help": "fnmatch patterns of parameters kept in float"}
    )
    float16: bool = field(default=False, metadata={"help": "store float parameters in float16"})

    def mode(self) -> str:
        """``"diffq"``, ``"qat"`` or ``"lsq"``; raises ``ConfigError`` on contradictory options."""
        if self.penalty < 0:
            raise ConfigError(f"--penalty {self.penalty} must be >= 0")
        if self.bits and self.penalty:
            raise ConfigError("give --penalty (DiffQ) or --bits (QAT/LSQ), not both")
        if self.lsq and not self.bits:
            raise ConfigError("--lsq needs --bits")
        if self.bits:
            return "lsq" if self.lsq else "qat"
        return "diffq"


def quantizer_of(model: nn.Module) -> BaseQuantizer | None:
    """The quantizer the ``diffq`` method attached to ``model`` (``None`` if none)."""
    return getattr(model, _ATTR, None)


def build_quantizer(model: nn.Module, config: DiffQMethodConfig) -> BaseQuantizer:
    """Attaches the quantizer that ``config`` selects to ``model``."""
    common = dict(min_size=config.min_size, float16=config.float16, exclude=list(config.exclude))
    mode = config.mode()
    if mode == "qat":
        return UniformQuantizer(model, bits=config.bits, qat=True, **common)
    if mode == "lsq":
        return LSQ(model, bits=config.bits, **common)
    return DiffQuantizer(
        model,
        group_size=config.group_size,
        min_bits=config.min_bits,
        max_bits=config.max_bits,
        init_bits=config.init_bits,
        **common,
    )


@METHODS.register("diffq")
class DiffQMethod(TrainMethod):
    """DiffQ (``--penalty``, ``--group-size``), or its QAT (``--bits``) and LSQ baselines."""

    name = "diffq"
    Config = DiffQMethodConfig
    summary = "DiffQ learnt bits (--penalty, --group-size); --bits: QAT; --bits --lsq: LSQ"

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        assert isinstance(self.config, DiffQMethodConfig)
        self.cfg: DiffQMethodConfig = self.config
        self.cfg.mode()  # fail early on contradictory options
        self.quantizer: BaseQuantizer | None = None

    def prepare_model(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self.quantizer = build_quantizer(model, self.cfg)
        object.__setattr__(model, _ATTR, self.quantizer)  # not a submodule, not in state_dict
        return model

    def _extra_ids(self) -> set[int]:
        return {id(p) for p in self.quantizer.extra_parameters()} if self.quantizer else set()

    def param_groups(
        self, model: nn.Module, base_lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        groups = super().param_groups(model, base_lr, weight_decay)
        if isinstance(self.quantizer, DiffQuantizer):  # the logits get their own Adam
            extra = self._extra_ids()
            for g in groups:
                g["params"] = [p for p in g["params"] if id(p) not in extra]
            groups = [g for g in groups if g["params"]]
        if self.quantizer is not None:
            self.quantizer.no_optimizer()  # LSQ steps stay in the main groups (LSQ's own lr)
        return groups

    def extra_optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        if not isinstance(self.quantizer, DiffQuantizer):
            return []
        params = self.quantizer.extra_parameters()
        if not params:
            raise ConfigError(
                "DiffQ found no parameter to quantize (all are excluded or under min_size="
                f"{self.cfg.min_size} MB): lower --min-size or change --exclude"
            )
        return [torch.optim.Adam(params, lr=self.cfg.bits_lr, weight_decay=0.0)]

    def penalty(self, model: nn.Module) -> Tensor | None:
        if isinstance(self.quantizer, DiffQuantizer) and self.cfg.penalty > 0:
            return self.cfg.penalty * self.quantizer.model_size()
        return None

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        return size_report(self.quantizer, model) if self.quantizer is not None else {}


def size_report(quantizer: BaseQuantizer, model: nn.Module) -> dict[str, float]:
    """``model_size_mb`` (true quantized size), ``float_size_mb``, ``compression`` and, for
    DiffQ, ``bits_per_weight`` and the differentiable ``soft_model_size_mb``."""
    extra = set(map(id, quantizer.extra_parameters()))
    seen: set[int] = set()
    nbytes = 0
    for p in model.parameters():
        if id(p) not in extra and id(p) not in seen:
            seen.add(id(p))
            nbytes += p.numel() * 4
    true_mb = quantizer.true_model_size()
    report = {
        "model_size_mb": true_mb,
        "float_size_mb": nbytes / 2**20,
        "compression": nbytes / 2**20 / true_mb if true_mb > 0 else 0.0,
    }
    if isinstance(quantizer, DiffQuantizer):
        with torch.no_grad():
            report["soft_model_size_mb"] = float(quantizer.model_size())
        report["bits_per_weight"] = quantizer.bits_per_weight()
    return report

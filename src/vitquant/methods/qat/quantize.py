"""Building and initialising the quantized models of the QAT methods.

One :class:`QATScheme` describes where each method puts which quantizer; :func:`build_qat_model`
turns a float ViT into the quantized model with :func:`vitquant.quant.prepare` (FasterTransformer's
``ft1`` GEMM points: every Linear input and weight, q, k, v and the attention probabilities),
choosing the quantizer class per point through the config's overrides:

* LSQ (Esser et al., 2020): LSQ weights per channel, LSQ activations per tensor, LSQ+ (unsigned
  with a learnable offset) on the GELU output entering ``fc2``;
* Q-ViT (Li et al., 2022): Q-ViT's activation quantizer (learnable zero point) per input feature
  on Linear inputs and per head on q, k, v and the attention probabilities, plus the
  information rectification module on q and k (:mod:`vitquant.methods.qvit.irm`);
* VVTQ (Huang et al., 2024): separate q/k/v projections
(:mod:`vitquant.methods.vvtq.split_attention`),
  weight quantizers that track and freeze oscillations, LSQ+ after GELU.

The patch embedding and the classifier head(s) are quantized at ``edge_bits`` (8), as in Q-ViT
and VVTQ. :func:`init_qat` initialises every step size from calibration batches (MSE fit by
default) and, first, the IRM statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vitquant.errors import ConfigError
from vitquant.quant import QuantConfig, calibrate, named_quantizers, prepare
from vitquant.quant.primitives import check_bits

__all__ = [
    "QATModule",
    "QATScheme",
    "SCHEME_CHOICES",
    "SCHEME_TRANSFORMS",
    "qat_config",
    "build_qat_model",
    "init_qat",
    "qat_modules",
]

INIT_METHODS = ("mse", "lsq", "max", "percentile")

#: ``QATScheme`` flag -> ``transform(model, scheme)`` run before ``prepare`` when the flag is set;
#: each method package registers its own (Q-ViT: ``irm``, VVTQ: ``split_qkv``), so this shared
#: module imports none of them.
SCHEME_TRANSFORMS: dict[str, Callable[[nn.Module, QATScheme], None]] = {}
#: ``QATScheme`` field -> the values it accepts, registered with the transform that reads it
SCHEME_CHOICES: dict[str, tuple[str, ...]] = {}


class QATModule(nn.Module):
    """A module a QAT scheme adds besides its quantizers (Q-ViT's IRM).

    :func:`init_qat` initialises it from float statistics before the step sizes
    (``start_calibration`` / forward passes / ``finish_calibration``), and
    :class:`~vitquant.methods.qat.method.QATMethod` trains its parameters in the quantizers'
    group (no weight decay, ``quant_lr_scale``).
    """

    def start_calibration(self) -> None:
        """Starts collecting statistics (default: nothing to collect)."""

    def finish_calibration(self) -> None:
        """Sets the parameters from the collected statistics."""


@dataclass
class QATScheme:
    """Where a QAT method puts which quantizer.

    Args:
        wbits: weight bits of the transformer blocks (2..8).
        abits: activation bits of the transformer blocks (2..8).
        weight_quantizer: ``"lsq"`` or ``"vvtq"`` (LSQ + oscillation tracking/freezing).
        weight_granularity: ``"channel"`` or ``"tensor"``.
        input_quantizer: quantizer of Linear inputs: ``"lsq"`` or ``"qvit"``.
        input_granularity: ``"tensor"`` or ``"channel"`` (per input feature, as Q-ViT).
        attn_quantizer: quantizer of q, k, v and the attention probabilities.
        attn_granularity: ``"tensor"`` or ``"head"``.
        post_gelu_offset: LSQ+ (unsigned, learnable offset) on the GELU output entering ``fc2``.
        edge_bits: bits of the patch embedding and the head(s) (weights and inputs).
        irm: Q-ViT's information rectification on q and k.
        irm_stats: where IRM's μ and σ come from: ``"channel"`` (fixed at calibration: a
            learnable per-channel affine), ``"dynamic"`` (the paper's: the current q/k's) or
            ``"token"`` (:class:`~vitquant.methods.qvit.irm.InformationRectification`).
        split_qkv: separate q/k/v projections (VVTQ).
    """

    wbits: int = 4
    abits: int = 4
    weight_quantizer: str = "lsq"
    weight_granularity: str = "channel"
    input_quantizer: str = "lsq"
    input_granularity: str = "tensor"
    attn_quantizer: str = "lsq"
    attn_granularity: str = "tensor"
    post_gelu_offset: bool = True
    edge_bits: int = 8
    irm: bool = False
    irm_stats: str = "channel"
    split_qkv: bool = False

    def __post_init__(self) -> None:
        self.wbits = check_bits(self.wbits, 2, 8, "wbits")
        self.abits = check_bits(self.abits, 2, 8, "abits")
        self.edge_bits = check_bits(self.edge_bits, 2, 16, "edge_bits")
        for name, value, allowed in (
            ("weight_granularity", self.weight_granularity, ("channel", "tensor")),
            ("input_granularity", self.input_granularity, ("channel", "tensor")),
            ("attn_granularity", self.attn_granularity, ("head", "tensor")),
            ("weight_quantizer", self.weight_quantizer, ("lsq", "vvtq")),
            ("input_quantizer", self.input_quantizer, ("lsq", "qvit")),
            ("attn_quantizer", self.attn_quantizer, ("lsq", "qvit")),
        ):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        for name, allowed in SCHEME_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def qat_config(scheme: QATScheme) -> QuantConfig:
    """The :class:`~vitquant.quant.QuantConfig` that places the scheme's quantizers."""
    edge = {"bits": scheme.edge_bits}
    overrides: dict[str, dict[str, Any]] = {
        "weight": {"quantizer": scheme.weight_quantizer},
        "linear_input": {
            "quantizer": scheme.input_quantizer,
            "granularity": scheme.input_granularity,
        },
        "matmul_input": {"quantizer": scheme.attn_quantizer},
        "softmax_output": {"quantizer": scheme.attn_quantizer, "signed": False},
    }
    if scheme.post_gelu_offset:
        overrides["*mlp.fc2.input_quantizer"] = {"quantizer": "lsq+", "symmetric": False}
    overrides["patch_embed.*"] = dict(edge)
    # the image entering the patch embedding: one step for the whole tensor
    overrides["patch_embed.proj.input_quantizer"] = {"quantizer": "lsq", "granularity": "tensor"}
    for head in ("head", "head_dist"):
        overrides[f"{head}.*"] = dict(edge)
    return QuantConfig(
        preset="ft1",
        wbits=scheme.wbits,
        abits=scheme.abits,
        calibrator="mse",
        weight_granularity=scheme.weight_granularity,
        act_granularity=scheme.attn_granularity,
        act_symmetric=True,
        softmax_quantizer="uniform",
        quantize_patch_embed=True,
        quantize_head=True,
        overrides=overrides,
    )


def qat_modules(model: nn.Module) -> list[QATModule]:
    """The :class:`QATModule` s of ``model`` (IRM), in module order."""
    return [m for m in model.modules() if isinstance(m, QATModule)]


def build_qat_model(model: nn.Module, scheme: QATScheme) -> nn.Module:
    """Quantizes a float ViT in place for QAT (quantizers uncalibrated until :func:`init_qat`).

    Raises:
        ConfigError: the model is already prepared, or has no attention layers for IRM.
    """
    for flag in ("split_qkv", "irm"):
        if getattr(scheme, flag):
            if flag not in SCHEME_TRANSFORMS:
                raise ConfigError(f"no method package registered the QAT scheme's {flag!r}")
            SCHEME_TRANSFORMS[flag](model, scheme)
    prepare(model, qat_config(scheme))
    object.__setattr__(model, "_vitquant_qat_scheme", scheme)
    return model


def init_qat(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int = 4,
    method: str = "mse",
    device: str | torch.device | None = None,
) -> nn.Module:
    """Initialises the :class:`QATModule` s (IRM) from statistics, then every step size (and zero
    point) of ``model``.

    Args:
        model: a model from :func:`build_qat_model`.
        data: batches of ``(images, labels)`` (or images).
        num_batches: batches to observe.
        method: ``"mse"`` (MSE fit of the clipping range), ``"lsq"`` (``2·mean|x|/sqrt(Q_P)``),
            ``"max"`` or ``"percentile"``; weights use the same method (``"lsq"`` weights: MSE).
        device: where to run (default: the model's).
    """
    if method not in INIT_METHODS:
        raise ConfigError(f"init must be one of {', '.join(INIT_METHODS)}, not {method!r}")
    irms = qat_modules(model)
    if irms:
        from vitquant.quant import batch_input, quantization_disabled

        dev = torch.device(device) if device is not None else next(model.parameters()).device
        was = model.training
        model.eval()
        for m in irms:
            m.start_calibration()
        try:
            with quantization_disabled(model), torch.no_grad():
                for i, batch in enumerate(data):
                    if i >= num_batches:
                        break
                    model(batch_input(batch).to(dev))
        finally:
            for m in irms:
                m.finish_calibration()
            model.train(was)
    act_method = "mse" if method == "lsq" else method
    calibrate(
        model,
        data,
        method=act_method,
        num_batches=num_batches,
        device=device,
        progress=False,
        weight_method="mse" if method == "lsq" else method,
    )
    if method == "lsq":
        _lsq_statistics_init(model, data, num_batches, device)
    return model


def _lsq_statistics_init(
    model: nn.Module, data: Iterable[Any], num_batches: int, device: str | torch.device | None
) -> None:
    """Re-initialises symmetric LSQ activation steps with ``2·mean|x|/sqrt(Q_P)``."""
    from vitquant.quant import batch_input, quantization_disabled

    qs = [q for _, q in named_quantizers(model) if q.role != "weight" and q.symmetric]
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    for q in qs:
        q.start_calibration("lsq")
    try:
        with quantization_disabled(model), torch.no_grad():
            for i, batch in enumerate(data):
                if i >= num_batches:
                    break
                model(batch_input(batch).to(dev))
        for q in qs:
            q.finish_calibration("lsq")
    finally:
        for q in qs:
            q.calibrating = False
        model.train(was)

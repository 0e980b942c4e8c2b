"""Block reconstruction's options, reports and learned parameters (BRECQ with AdaRound).

Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction",
ICLR 2021, arXiv 2102.05426, with the rounding of Nagel et al., "Up or Down? Adaptive Rounding
for Post-Training Quantization" (AdaRound), ICML 2020, arXiv 2004.10568, and LSQ-refined
activation scales (Esser et al., arXiv 1902.08153). This module holds:

* :class:`ReconstructConfig` (the options), :class:`BlockReport` and :class:`ReconstructReport`;
* :class:`_Rounding`: AdaRound's variables ``V`` of one weight, ``h(V) = clamp(sigmoid(V) *
  (zeta - gamma) + gamma, 0, 1)`` and its regulariser ``sum(1 - |2h - 1|^beta)``;
* :class:`_ActScale`: an activation quantizer's learned scale ``s0 * exp(theta)``;
* :func:`_learned_parts` (a block's parts) and :func:`_standing_in` (their forwards replace the
  quantizers' while the block is optimised).

Split out of :mod:`vitquant.methods.ptq.reconstruct` (the block loop, :func:`reconstruct`), which
re-exports the public names here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.quant import primitives as P
from vitquant.quant.api import named_quantizers
from vitquant.quant.modules import QuantModule
from vitquant.quant.quantizers import Quantizer

__all__ = ["ReconstructConfig", "BlockReport", "ReconstructReport"]

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid
_LOSSES = ("mse", "fisher")


@dataclass
class ReconstructConfig:
    """Settings of :func:`reconstruct`.

    Args:
        iterations: optimisation steps per block (below ~60 the regulariser anneals too fast
            for the hard rounding to beat round-to-nearest reliably).
        batch_size: images per step (drawn at random from the calibration images).
        lr: Adam learning rate of the rounding variables ``V``.
        act_lr: Adam learning rate of the log activation scales (a relative step: 1e-3 moves a
            scale by about 0.1% per step).
        weights: learn the rounding of the weights (AdaRound).
        activations: refine the activation scales of the block's uniform quantizers.
        reg_weight: ``lambda`` of the rounding regulariser (the loss is the block output's MSE
            relative to the float output's mean square).
        beta_start, beta_end: the regulariser's exponent, annealed linearly after the warm-up.
        warmup: fraction of the steps without the regulariser.
        drop_prob: QDrop: probability that an input element of the quantized block is taken from
            the float input instead (0: BRECQ, the quantized input only).
        max_bits: weight quantizers inside the blocks must have at most this many bits (2..8).
        loss: ``"mse"`` (each output element alike) or ``"fisher"`` (BRECQ's Fisher-weighted
            MSE: elements weighted by the squared gradient of the float model's loss against
            its own top-1, :mod:`vitquant.methods.ptq.fisher`).
        fisher_mix: with ``loss="fisher"``, the Fisher term's share of each weight (0..1; the
            rest is the uniform weight of the MSE).
        seed: seed of the batch sampling and the QDrop masks.
        progress: show a tqdm bar (rate and ETA) over blocks x iterations.
    """

    iterations: int = 500
    batch_size: int = 8
    lr: float = 1e-1
    act_lr: float = 1e-2
    weights: bool = True
    activations: bool = True
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float = 0.0
    max_bits: int = 8
    loss: str = "mse"
    fisher_mix: float = 1.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name in ("lr", "act_lr", "beta_start", "beta_end"):
            if not float(getattr(self, name)) > 0.0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be positive")
        if not float(self.reg_weight) >= 0.0:
            raise ConfigError(f"reg_weight={self.reg_weight!r} must be >= 0")
        for name in ("warmup", "drop_prob"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be in [0, 1)")
        self.max_bits = P.check_bits(self.max_bits, 2, 8, what="max_bits")
        if self.loss not in _LOSSES:
            raise ConfigError(f"loss={self.loss!r}: choose one of {', '.join(_LOSSES)}")
        if not 0.0 <= float(self.fisher_mix) <= 1.0:
            raise ConfigError(f"fisher_mix={self.fisher_mix!r} must be in [0, 1]")
        if not (self.weights or self.activations):
            raise ConfigError("nothing to reconstruct: set weights=True or activations=True")


@dataclass
class BlockReport:
    """One block: relative output MSE (``mean((y_q - y)^2) / mean(y^2)`` over the calibration
    images, the quantized block reading the quantized model's input) before and after; with
    ``loss="fisher"`` each squared error is Fisher-weighted, the objective the block learned."""

    name: str
    mse_before: float
    mse_after: float
    weights: int  # weights whose rounding was learned
    flipped: int  # of those, rounded to the other neighbour than round-to-nearest
    act_quantizers: int  # activation quantizers whose scale was refined
    kept: bool  # the learned state did not lower the MSE: round-to-nearest and the scales stay
    seconds: float


@dataclass
class ReconstructReport:
    """What :func:`reconstruct` did, block by block (``to_dict`` is JSON-ready)."""

    blocks: list[BlockReport] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- learned parts ---------------------------------------------------------------------------
class _Rounding:
    """AdaRound variables of one weight and its quantizer (the quantizer's scale stays)."""

    def __init__(self, q: Quantizer, weight: nn.Parameter) -> None:
        w = weight.detach()
        self.q, self.param = q, weight
        self.s = q.expanded(q.scale.detach(), w)
        self.z = q.expanded(q.zero_point.detach(), w)
        x = w / self.s
        self.floor = torch.floor(x)
        rest = (x - self.floor).clamp(0.0, 1.0)
        self.v = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1.0))
        self.hard = False

    def h(self) -> Tensor:
        if self.hard:
            return (self.v >= 0).to(self.floor.dtype)
        return torch.clamp(torch.sigmoid(self.v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)

    def codes(self) -> Tensor:
        return torch.clamp(self.floor + self.h() + self.z, self.q.qmin, self.q.qmax)

    def weight(self) -> Tensor:
        return ((self.codes() - self.z) * self.s).to(self.param.dtype)

    def reg(self, beta: float) -> Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def forward(self, x: Tensor) -> Tensor:
        """Stands in for the quantizer's forward while the rounding is learned."""
        if x.shape != self.floor.shape:
            raise ConfigError(f"{self.q.name}: quantizes a tensor shaped unlike its weight")
        return self.weight()


class _ActScale:
    """A learned scale ``s0 * exp(theta)`` of one activation quantizer (LSQ gradient)."""

    def __init__(self, q: Quantizer) -> None:
        self.q = q
        self.s0 = q.scale.detach().clone()
        self.z = q.zero_point.detach().clone()
        self.theta = nn.Parameter(torch.zeros_like(self.s0))

    def scale(self) -> Tensor:
        return self.s0 * torch.exp(self.theta)

    def forward(self, x: Tensor) -> Tensor:
        """Stands in for the quantizer's forward: fake quantization with the learned scale (the
        fused LSQ kernel of ``torch.ao``'s learnable fake quantization for per-tensor scales)."""
        if self.s0.numel() == 1:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale().reshape(1), self.z.reshape(1), self.q.qmin, self.q.qmax, 1.0
            )
        s, z = self.q.expanded(self.scale(), x), self.q.expanded(self.z, x)
        codes = torch.clamp(P.round_ste(x / s) + z, self.q.qmin, self.q.qmax)
        return ((codes - z) * s).to(x.dtype)


def _learned_parts(
    name: str, block: nn.Module, cfg: ReconstructConfig
) -> tuple[list[_Rounding], list[_ActScale]]:
    """The block's uniform weight quantizers (when ``cfg.weights``) and activation quantizers."""
    roundings: list[_Rounding] = []
    weight_qs: set[int] = set()
    for m in block.modules():
        if not isinstance(m, QuantModule):
            continue
        for slot, pname in m.quant_weights.items():
            q = getattr(m, slot, None)
            if not isinstance(q, Quantizer) or not q.active:
                continue
            weight_qs.add(id(q))
            if q.bits > cfg.max_bits:
                raise ConfigError(
                    f"{q.name}: {q.bits}-bit weights; reconstruction takes weights of "
                    f"2..{cfg.max_bits} bits (max_bits)"
                )
            if cfg.weights and q.kind == "uniform":
                roundings.append(_Rounding(q, getattr(m, pname)))
    acts: list[_ActScale] = []  # every uniform activation quantizer (learned or not)
    for _, q in named_quantizers(block):
        if id(q) in weight_qs or q.role == "weight" or not q.active or q.kind != "uniform":
            continue
        if isinstance(q.scale, nn.Parameter):
            continue  # a trained (LSQ) scale: not a calibrated range
        acts.append(_ActScale(q))
    return roundings, acts


@contextlib.contextmanager
def _standing_in(parts: list[_Rounding] | list[_ActScale]) -> Iterator[None]:
    """The parts' forwards replace their quantizers' while inside (the quantizers' own fake
    quantization would run, and its result be thrown away, with a forward hook)."""
    try:
        for part in parts:
            part.q.forward = part.forward  # type: ignore[method-assign]
        yield
    finally:
        for part in parts:
            part.q.__dict__.pop("forward", None)

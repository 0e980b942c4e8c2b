"""Block reconstruction for low-bit PTQ: :func:`reconstruct`, :class:`ReconstructConfig`,
:class:`ReconstructReport`.

A calibrated model (``prepare`` + ``calibrate``) rounds every weight to the nearest grid point and
keeps the calibrated activation ranges. At 4 bits and below that loses much; this module learns,
block by block as BRECQ (Li et al., ICLR 2021, arXiv 2102.05426), the rounding of each weight up
or down (AdaRound, Nagel et al., ICML 2020, arXiv 2004.10568) and refines the activation step
sizes with an LSQ gradient (Esser et al., arXiv 1902.08153), so that each quantized transformer
block reproduces its float counterpart's output (MSE) on a few hundred unlabelled images:

* the quantized block reads the output of the already reconstructed quantized blocks before it
  (optionally mixed element-wise with the float input, QDrop, Wei et al., ICLR 2022);
* weight ``w`` on grid ``(s, z)`` is ``s * (clamp(floor(w / s) + h(V) + z, qmin, qmax) - z)``
  with ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, ``V`` initialised so that
  ``h`` is the fractional part (the float weight), and the regulariser
  ``lambda * sum(1 - |2h - 1|^beta)`` with ``beta`` annealed from 20 to 2 after a warm-up;
* activation scales ``s = s0 * exp(theta)`` (zero points fixed) get the LSQ gradient of the
  fake quantization ``(clamp(round_ste(x / s) + z, qmin, qmax) - z) * s``.
* optionally (``loss="fisher"``) the MSE weights each output element by the diagonal Fisher
  information of the float model's loss (BRECQ section 3.2; :mod:`vitquant.methods.ptq.fisher`).

The result stays a plain calibrated model: the hard rounding (``h = 1`` where ``V >= 0``) is
written back into the float weights exactly on the weight quantizer's grid, so the existing
round-to-nearest quantizer (:meth:`~vitquant.quant.Quantizer.int_codes`) reproduces the learned
codes, and the refined scales are set with :meth:`~vitquant.quant.Quantizer.set_qparams`. Export
and :func:`vitquant.runtime.lower` need nothing new. Re-calibrating the weights afterwards would
change their scales and lose the learned rounding. A block whose learned state does not lower
its error on the calibration images keeps round-to-nearest (``BlockReport.kept``).

Cost: the defaults (500 steps of 8 images per block) took 15.4 min for a ViT-Ti
(``vit_tiny_patch16_224``, 224x224, 12 blocks) on 128 images on a shared 2-core CPU with
``torch.set_num_threads(1)``; two threads were 5x slower there (every element-wise op waits for
a descheduled worker).

Length: just over 500 lines because the block loop, the soft rounding, the scale refinement
and the exact write-back share their state; its options and report are the dataclasses above.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError, DataError
from vitquant.methods.ptq.fisher import block_fisher_weights
from vitquant.quant import primitives as P
from vitquant.quant.api import batch_input, get_config, named_quantizers
from vitquant.quant.modules import QuantModule
from vitquant.quant.quantizers import Quantizer
from vitquant.quant.quantizers.base import RANGE_TENSORS

__all__ = ["ReconstructConfig", "BlockReport", "ReconstructReport", "reconstruct"]

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid
_EVAL_BATCH = 64  # images per forward pass without gradients
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


# --- structure -------------------------------------------------------------------------------
def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost transformer blocks (modules with ``attn`` and ``mlp``) holding quantizers."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not name or not hasattr(m, "attn") or not hasattr(m, "mlp"):
            continue
        if any(name.startswith(b + ".") for b, _ in found):
            continue
        if any(isinstance(c, Quantizer) for c in m.modules()):
            found.append((name, m))
    return found


def _chained(model: nn.Module, names: list[str]) -> bool:
    """True when the blocks are consecutive children of one ``nn.Sequential`` (each block's
    input is the previous one's output)."""
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) != 1:
        return False
    parent_name = parents.pop()
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return False
    keys = list(parent._modules)
    idx = [keys.index(n.rpartition(".")[2]) for n in names]
    return idx == list(range(idx[0], idx[0] + len(idx)))


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


# --- data ------------------------------------------------------------------------------------
class _Stop(Exception):
    """Ends a forward pass once the block's input is captured."""


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _capture(model: nn.Module, block: nn.Module, images: Tensor) -> Tensor:
    """The input of ``block`` when ``model`` runs on ``images`` (the pass stops there)."""
    got: list[Tensor] = []

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
            raise ConfigError("reconstruct: blocks must take one tensor (the tokens) as input")
        got.append(args[0].detach())
        raise _Stop

    hook = block.register_forward_pre_hook(pre, with_kwargs=True)
    dev = _device(model)
    try:
        with torch.no_grad():
            for chunk in images.split(_EVAL_BATCH):
                try:
                    model(chunk.to(dev))
                except _Stop:
                    pass
    finally:
        hook.remove()
    if len(got) != len(images.split(_EVAL_BATCH)):
        raise ConfigError("reconstruct: the model's forward pass does not reach every block")
    return torch.cat(got)


def _run(block: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([block(c) for c in x.split(_EVAL_BATCH)])


def _sq_error(out: Tensor, y: Tensor, w: Tensor | None) -> Tensor:
    """Mean squared error, each element weighted by ``w`` when given (Fisher weights)."""
    err = (out - y).pow(2)
    return (err if w is None else err * w.to(err.dtype)).mean()


def _rel_mse(
    block: nn.Module, x: Tensor, y: Tensor, norm: Tensor, w: Tensor | None
) -> tuple[float, Tensor]:
    """``(relative (weighted) MSE of block(x) against y, block(x))``."""
    out = _run(block, x)
    return float(_sq_error(out, y, w) / norm), out


def _images(batches: Iterable[Any]) -> Tensor:
    xs = [batch_input(b).detach().cpu() for b in batches]
    if not xs:
        raise DataError("reconstruct: the calibration data yielded no batches")
    try:
        return torch.cat(xs)
    except RuntimeError as e:
        raise DataError(f"reconstruct: calibration batches of different shapes ({e})") from None


# --- the method ------------------------------------------------------------------------------
def _check(model_float: nn.Module, model_q: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, quantized block, float block)`` of every block, after the input checks."""
    if model_float is model_q:
        raise ConfigError("reconstruct: pass the float model and a prepared copy, not one model")
    if get_config(model_q) is None and not any(True for _ in named_quantizers(model_q)):
        raise ConfigError("the model is not prepared for quantization: call prepare() first")
    if any(q.active for _, q in named_quantizers(model_float)):
        raise ConfigError("reconstruct: model_float has active quantizers; pass the float model")
    missing = [n for n, q in named_quantizers(model_q) if q.enabled and not q.is_calibrated]
    if missing:
        raise ConfigError(
            f"reconstruct: {len(missing)} quantizer(s) were never calibrated, e.g. {missing[0]} "
            "(run calibrate() first)"
        )
    blocks = _blocks(model_q)
    if not blocks:
        raise ConfigError("reconstruct: no quantized transformer block (module with attn, mlp)")
    pairs = []
    for name, qb in blocks:
        try:
            fb = model_float.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"reconstruct: model_float has no block {name!r}; pass the float model the "
                "quantized one was prepared from"
            ) from None
        pairs.append((name, qb, fb))
    return pairs


def _beta(cfg: ReconstructConfig, it: int) -> float | None:
    """The regulariser's exponent at step ``it`` (None during the warm-up)."""
    start = int(cfg.warmup * cfg.iterations)
    if it < start:
        return None
    t = (it - start) / max(1, cfg.iterations - start)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - t)


def _optimise(
    name: str,
    qb: nn.Module,
    data: tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None],
    parts: tuple[list[_Rounding], list[_ActScale]],
    cfg: ReconstructConfig,
    gen: torch.Generator,
    bar: Any,
) -> None:
    """The optimisation loop (the learned parts stand in for the quantizers)."""
    x_q, x_fp, y, norm, w = data
    roundings, acts = parts
    groups = []
    if roundings:
        groups.append({"params": [r.v for r in roundings], "lr": cfg.lr})
    if cfg.activations and acts:
        groups.append({"params": [a.theta for a in acts], "lr": cfg.act_lr})
    opt = torch.optim.Adam(groups)
    frozen = [p for p in qb.parameters() if p.requires_grad]
    n = x_q.shape[0]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with _standing_in(roundings), _standing_in(acts), torch.enable_grad():
            for it in range(cfg.iterations):
                idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen)
                x = x_q[idx]
                if cfg.drop_prob > 0:
                    keep = torch.rand(x.shape, generator=gen) < cfg.drop_prob
                    x = torch.where(keep.to(x.device), x_fp[idx], x)
                loss = _sq_error(qb(x), y[idx], None if w is None else w[idx]) / norm
                beta = _beta(cfg, it)
                if beta is not None and roundings and cfg.reg_weight > 0:
                    loss = loss + cfg.reg_weight * sum(r.reg(beta) for r in roundings)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                bar.update(1)
                if it % 10 == 0:
                    bar.set_postfix(block=name, loss=f"{float(loss.detach()):.4g}", refresh=False)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _reconstruct_block(
    name: str,
    qb: nn.Module,
    x_q: Tensor,
    x_fp: Tensor,
    y: Tensor,
    w: Tensor | None,
    cfg: ReconstructConfig,
    gen: torch.Generator,
    bar: Any,
) -> tuple[BlockReport, Tensor]:
    """Reconstructs one block in place; returns its report and its output on ``x_q``.

    The errors before and after are measured with the activation quantizers' fused stand-ins
    (the same codes as their own forward, up to float rounding at ties, several times faster).
    """
    t0 = time.perf_counter()
    norm = y.pow(2).mean().clamp_min(1e-12)
    roundings, acts = _learned_parts(name, qb, cfg)
    with _standing_in(acts):
        before, out = _rel_mse(qb, x_q, y, norm, w)
    learned = acts if cfg.activations else []
    if not roundings and not learned:
        bar.update(cfg.iterations)
        return BlockReport(name, before, before, 0, 0, 0, True, time.perf_counter() - t0), out
    _optimise(name, qb, (x_q, x_fp, y, norm, w), (roundings, acts), cfg, gen, bar)
    saved = [(r.param, r.param.detach().clone()) for r in roundings]
    ranges = [(a.q, {k: getattr(a.q, k).clone() for k in RANGE_TENSORS}) for a in learned]
    flipped = _write_back(roundings, learned)
    with _standing_in(acts):  # the learned scales, now also the quantizers' own
        after, out_after = _rel_mse(qb, x_q, y, norm, w)
    kept = not after < before
    if kept:  # learning did not help on these images: back to round-to-nearest
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)
        for q, tensors in ranges:
            for k, v in tensors.items():
                setattr(q, k, v)
        flipped = 0
    else:
        out = out_after
    n_weights, seconds = sum(r.floor.numel() for r in roundings), time.perf_counter() - t0
    mse = before if kept else after
    return BlockReport(name, before, mse, n_weights, flipped, len(learned), kept, seconds), out


def _write_back(roundings: list[_Rounding], acts: list[_ActScale]) -> int:
    """Writes the hard rounding into the weights (on the grid) and the scales into the
    quantizers; returns the number of weights rounded away from the nearest grid point."""
    flipped, new = 0, []
    with torch.no_grad():
        for r in roundings:
            r.hard = True
            codes, w = r.codes(), r.weight()
            if not torch.equal(r.q.int_codes(w), codes):  # checked before any weight changes
                raise ConfigError(f"{r.q.name}: its codes do not reproduce the learned rounding")
            flipped += int((codes != r.q.int_codes(r.param.detach())).sum())
            new.append((r.param, w))
        for param, w in new:
            param.copy_(w)
        for a in acts:
            a.q.set_qparams(a.scale().detach(), a.z)
    return flipped


def reconstruct(
    model_float: nn.Module,
    model_quantized: nn.Module,
    batches: Iterable[Any],
    config: ReconstructConfig | None = None,
) -> ReconstructReport:
    """Learns weight rounding and activation scales block by block (BRECQ with AdaRound).

    Args:
        model_float: the float model (not modified).
        model_quantized: a prepared and calibrated copy of it (modified in place: its weights are
            moved onto their learned grid points, its activation scales refined).
        batches: calibration batches (tensors or ``(input, label)`` pairs); every image is used.
        config: a :class:`ReconstructConfig` (default settings when None).

    Returns:
        A :class:`ReconstructReport` with each block's relative output MSE before and after. A
        block whose learned state does not lower it keeps round-to-nearest (``kept``).

    Raises:
        ConfigError: an unprepared or uncalibrated model, the same object twice, a float model
            with active quantizers or without the quantized model's blocks, weights of more than
            ``max_bits`` bits, blocks that take more than one tensor.
        DataError: ``batches`` yields nothing, or batches of different shapes.
    """
    cfg = config if config is not None else ReconstructConfig()
    if not isinstance(cfg, ReconstructConfig):
        raise ConfigError(f"config must be a ReconstructConfig, not {type(cfg).__name__}")
    pairs = _check(model_float, model_quantized)
    images = _images(batches)
    t0 = time.perf_counter()
    was = (model_float.training, model_quantized.training)
    model_float.eval()
    model_quantized.eval()
    gen = torch.Generator().manual_seed(int(cfg.seed))
    names = [n for n, _, _ in pairs]
    chained = _chained(model_quantized, names) and _chained(model_float, names)
    report = ReconstructReport(images=int(images.shape[0]), config=asdict(cfg))
    fisher: list[Tensor | None] = [None] * len(pairs)
    if cfg.loss == "fisher":
        fisher = list(
            block_fisher_weights(model_float, [fb for *_, fb in pairs], images, cfg.fisher_mix)
        )
    from tqdm.auto import tqdm

    total = len(pairs) * cfg.iterations
    bar = tqdm(total=total, desc="reconstruct", unit="it", disable=not cfg.progress, leave=False)
    try:
        x_q = _capture(model_quantized, pairs[0][1], images)
        x_fp = _capture(model_float, pairs[0][2], images).to(x_q.device)
        for i, (name, qb, fb) in enumerate(pairs):
            if i and not chained:
                x_q = _capture(model_quantized, qb, images)
                x_fp = _capture(model_float, fb, images).to(x_q.device)
            y = _run(fb, x_fp.to(_device(fb))).to(x_q.device)
            w = fisher[i]
            w = None if w is None else w.to(x_q.device)
            block_report, out = _reconstruct_block(name, qb, x_q, x_fp, y, w, cfg, gen, bar)
            report.blocks.append(block_report)
            if chained:
                x_q, x_fp = out, y
    finally:
        bar.close()
        model_float.train(was[0])
        model_quantized.train(was[1])
    report.seconds = time.perf_counter() - t0
    return report

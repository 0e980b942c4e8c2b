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

The options and reports (:class:`ReconstructConfig`, :class:`BlockReport`,
:class:`ReconstructReport`) and the learned parts (the soft rounding, the refined scales) live in
:mod:`vitquant.methods.ptq.reconstruct_parts`; finding the blocks, capturing their inputs and
measuring their errors in :mod:`vitquant.methods.ptq.reconstruct_blocks`. This module keeps the
block loop, the optimisation and the exact write-back; it re-exports the public names of both.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.methods.ptq.fisher import block_fisher_weights
from vitquant.methods.ptq.reconstruct_blocks import (
    _capture,
    _chained,
    _check,
    _device,
    _images,
    _rel_mse,
    _run,
    _sq_error,
)
from vitquant.methods.ptq.reconstruct_parts import (
    BlockReport,
    ReconstructConfig,
    ReconstructReport,
    _ActScale,
    _learned_parts,
    _Rounding,
    _standing_in,
)
from vitquant.quant.quantizers.base import RANGE_TENSORS

__all__ = ["ReconstructConfig", "BlockReport", "ReconstructReport", "reconstruct"]


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

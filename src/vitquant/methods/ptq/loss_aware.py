"""Loss-aware calibration: each activation range chosen by the error it causes in its layer.

A histogram calibrator (max, percentile, MSE, entropy) picks a clipping range from the tensor
alone. With outlier channels that is the wrong question: clipping one channel that a layer hardly
reads costs nothing, clipping one it weighs heavily costs a lot, and the tensor's histogram cannot
tell the two apart. This pass asks the layer instead, as the output-reconstruction view of PTQ
does (Nagel et al., "A White Paper on Neural Network Quantization", 2021, section 3.4; BRECQ and
PTQ4ViT's Hessian-guided search minimise the same kind of output error):

* for every ``QuantLinear`` whose input quantizer is a calibrated per-tensor uniform quantizer, the
  layer's float inputs ``X`` are sampled (rows of a few calibration batches) and the range
  ``r·R`` is chosen on a geometric grid ``r = 2^(-k/8)``, ``k = 0..48`` (down to 1/64 of ``R``,
  ``R`` the larger of the calibrated range and the sampled maximum) to minimise
  ``‖ (Q(X) Q(W)ᵀ) − X Wᵀ ‖²``, with the layer's own (already calibrated) weight quantizer;
* for every ``QuantMatMul`` (q·kᵀ, attn·v) with uniform per-tensor operand quantizers, the same
  search on ``‖ Q(A) Q(B) − A B ‖²``, first for ``A`` with ``B`` float, then for ``B`` with ``A``
  at its new range.

The calibrated range is always one of the candidates, so no layer's output error on the sampled
rows gets worse. Asymmetric ranges ``[lo, hi]`` are scaled as a whole. Other quantizers (log2,
per-channel or per-head activations) keep their calibrated ranges. Registered as the calibration
pass ``"output_mse"`` (:mod:`vitquant.quant.passes`): ``QuantConfig(..., passes=["output_mse"])``,
or :func:`refine_ranges` directly on a calibrated model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.errors import ConfigError, DataError
from vitquant.quant.api import batch_input, named_quantizers, quantization_disabled
from vitquant.quant.modules import QuantLinear, QuantMatMul
from vitquant.quant.modules.linear import SMOOTH_BUFFER
from vitquant.quant.passes import CALIBRATION_PASSES, CalibrationPass
from vitquant.quant.quantizers import Quantizer
from vitquant.quant.quantizers.base import gran_kind

__all__ = ["RangeChoice", "refine_ranges", "OutputMSE", "candidate_ratios"]


@dataclass
class RangeChoice:
    """The range chosen for one quantizer: old and new ``amax`` (and ``amin``), output errors."""

    name: str
    old_amax: float
    new_amax: float
    old_error: float
    new_error: float


def candidate_ratios(steps_per_octave: int = 8, octaves: int = 6) -> Tensor:
    """``2^(-k/steps_per_octave)``, ``k = 0..steps_per_octave·octaves``: 1 down to 2^-octaves."""
    k = torch.arange(steps_per_octave * octaves + 1, dtype=torch.float64)
    return torch.pow(2.0, -k / steps_per_octave).float()


def _searchable(q: Quantizer | None) -> bool:
    return (
        q is not None
        and q.active
        and q.kind == "uniform"
        and gran_kind(q.granularity) == "tensor"
        and q.amax.numel() == 1
    )


def _sample_rows(x: Tensor, max_rows: int, gen: torch.Generator) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > max_rows:
        idx = torch.randperm(rows.shape[0], generator=gen)[:max_rows].to(rows.device)
        rows = rows[idx]
    return rows.detach().clone()


def _ranges(q: Quantizer, sample: Tensor, ratios: Tensor) -> list[tuple[Tensor, Tensor | None]]:
    """Candidate ``(amax, amin)`` pairs, the calibrated one first."""
    cur_hi = q.amax.detach().reshape(())
    cur_lo = q.amin.detach().reshape(()) if not q.symmetric and q.amin.numel() else None
    out: list[tuple[Tensor, Tensor | None]] = [(cur_hi.clone(), cur_lo)]
    if q.symmetric:
        top = torch.maximum(cur_hi, sample.abs().max().to(cur_hi))
        out += [(top * r, None) for r in ratios]
    else:
        hi = torch.maximum(cur_hi, sample.max().to(cur_hi))
        lo = torch.minimum(cur_lo if cur_lo is not None else hi * 0, sample.min().to(cur_hi))
        out += [(hi * r, lo * r) for r in ratios]
    return out


def _search(
    q: Quantizer, sample: Tensor, error: Any, ratios: Tensor
) -> tuple[float, float, float, float]:
    """Sets ``q`` to the candidate range of least ``error(q(sample))``; returns
    ``(old_amax, new_amax, old_error, new_error)``."""
    best: tuple[float, Tensor, Tensor | None] | None = None
    old_err = float("nan")
    old_amax = float(q.amax.reshape(()))
    for i, (hi, lo) in enumerate(_ranges(q, sample, ratios)):
        q.set_range(hi, lo)
        err = float(error(q(sample)))
        if i == 0:
            old_err = err
        if best is None or err < best[0]:
            best = (err, hi, lo)
    assert best is not None
    q.set_range(best[1], best[2])
    return old_amax, float(best[1]), old_err, best[0]


class _Capture:
    """Forward pre-hooks that keep a row sample of each target module's float inputs."""

    def __init__(self, modules: dict[str, nn.Module], max_rows: int, seed: int) -> None:
        self.inputs: dict[str, list[list[Tensor]]] = {n: [] for n in modules}
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if isinstance(module, QuantMatMul):
                a, b = args[0], args[1]
                keep = max(1, min(a.shape[0], self.max_rows // max(1, a[0].numel() // a.shape[-1])))
                self.inputs[name].append([a[:keep].detach().clone(), b[:keep].detach().clone()])
            else:
                self.inputs[name].append([_sample_rows(args[0], self.max_rows, self.gen)])

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def refine_ranges(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    num_batches: int = 4,
    max_rows: int = 2048,
    steps_per_octave: int = 8,
    octaves: int = 6,
    seed: int = 0,
    progress: bool = False,
) -> list[RangeChoice]:
    """Re-chooses the activation ranges of a calibrated model by their layers' output error.

    Args:
        model: a prepared and calibrated model (:func:`vitquant.quant.calibrate`).
        batches: calibration batches (tensors or ``(input, label)`` pairs).
        num_batches: batches whose inputs are sampled.
        max_rows: rows kept per layer and batch (Linear inputs) or their equivalent (matmuls).
        steps_per_octave: grid density of the candidate ranges.
        octaves: how far below the calibrated range the grid goes (``2^-octaves``).
        seed: seed of the row sampling.
        progress: show a tqdm progress bar over the layers.

    Returns:
        One :class:`RangeChoice` per quantizer searched.

    Raises:
        ConfigError: the model has no calibrated quantizer.
        DataError: ``batches`` is empty.
    """
    names = {id(q): n for n, q in named_quantizers(model)}
    if not names:
        raise ConfigError("refine_ranges needs a prepared and calibrated model")
    targets: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and _searchable(m.input_quantizer):
            targets[name] = m
        elif isinstance(m, QuantMatMul) and (
            _searchable(m.a_quantizer) or _searchable(m.b_quantizer)
        ):
            targets[name] = m
    if not targets:
        return []
    device = next(model.parameters()).device
    cap = _Capture(targets, max_rows, seed)
    seen = 0
    was_training = model.training
    model.eval()
    try:
        with quantization_disabled(model), torch.no_grad():
            for batch in batches:
                if seen >= num_batches:
                    break
                model(batch_input(batch).to(device))
                seen += 1
    finally:
        cap.close()
        model.train(was_training)
    if seen == 0:
        raise DataError("refine_ranges: the calibration batches are empty")
    ratios = candidate_ratios(steps_per_octave, octaves)
    choices: list[RangeChoice] = []
    items: Any = targets.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, total=len(targets), desc="output-aware ranges", leave=False)
    with torch.no_grad():
        for name, m in items:
            inputs = cap.inputs.pop(name)
            if isinstance(m, QuantLinear):
                choices += _refine_linear(m, inputs, names, ratios)
            else:
                choices += _refine_matmul(m, inputs, names, ratios)
    return choices


def _refine_linear(
    m: QuantLinear, inputs: list[list[Tensor]], names: dict[int, str], ratios: Tensor
) -> list[RangeChoice]:
    x = torch.cat([i[0] for i in inputs])
    smooth = m._buffers.get(SMOOTH_BUFFER)
    if smooth is not None:  # the quantizer sees the smoothed input x / s (QuantLinear.forward)
        x = x / smooth
    w = m.weight
    wq = m.weight_quantizer(w) if m.weight_quantizer is not None else w
    ref = F.linear(x, w)
    q = m.input_quantizer
    assert q is not None
    res = _search(q, x, lambda xq: (F.linear(xq, wq) - ref).pow(2).mean(), ratios)
    return [RangeChoice(names[id(q)], *res)]


def _refine_matmul(
    m: QuantMatMul, inputs: list[list[Tensor]], names: dict[int, str], ratios: Tensor
) -> list[RangeChoice]:
    a = torch.cat([i[0] for i in inputs])
    b = torch.cat([i[1] for i in inputs])
    ref = torch.matmul(a, b)
    out: list[RangeChoice] = []
    qa, qb = m.a_quantizer, m.b_quantizer
    if _searchable(qa):
        assert qa is not None
        res = _search(qa, a, lambda aq: (torch.matmul(aq, b) - ref).pow(2).mean(), ratios)
        out.append(RangeChoice(names[id(qa)], *res))
    a_used = qa(a) if qa is not None and qa.active else a
    if _searchable(qb):
        assert qb is not None
        res = _search(qb, b, lambda bq: (torch.matmul(a_used, bq) - ref).pow(2).mean(), ratios)
        out.append(RangeChoice(names[id(qb)], *res))
    return out


@CALIBRATION_PASSES.register("output_mse")
class OutputMSE(CalibrationPass):
    """The calibration pass of :func:`refine_ranges` (its keyword arguments are the options)."""

    name = "output_mse"
    option_names = frozenset({"num_batches", "max_rows", "steps_per_octave", "octaves", "seed"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.choices: list[RangeChoice] = []

    def after_ranges(self, model: nn.Module, batches: Sequence[Any], config: Any) -> None:
        self.choices = refine_ranges(model, batches, **self.options)

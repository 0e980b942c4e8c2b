"""Observers of asymmetric ``(min, max)`` activation ranges, for evaluation-time quantization.

The DiffQ seed evaluates trained models with ``--act-method {minmax, minmax_pc, histogram}``
(torch eager-mode observers). Here:

* :class:`MinMaxObserver` -- ``minmax`` / ``minmax_pc``: running min and max, per tensor or per
  channel;
* :class:`HistogramObserver` -- ``histogram``: a signed histogram over ``[-R, R]`` that grows
  exactly like :class:`~vitquant.quant.calibrators.HistogramCalibrator`, read by percentile or
  by an MSE search over affine ranges (the objective of torch.ao's ``HistogramObserver``, the
  L2 error of ``(min, max)`` quantization, with a coordinate-descent search instead of its greedy
  bin-shrinking).

Both follow the :class:`~vitquant.quant.calibrators.Calibrator` protocol (``collect``,
``state_dict``, ``all_reduce``, ...) and raise ``NonFiniteError`` on NaN/inf.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vitquant.errors import ConfigError
from vitquant.quant.calibrators import _WORK, _check_read
from vitquant.quant.collectors import (
    PowerOfTwoHistogram,
    RunningExtremes,
    _finite,
    _histc,
    _no_data,
    _pow2_at_least,
)
from vitquant.quant.primitives import qparams_from_minmax, qrange, quantize

__all__ = ["MinMaxObserver", "HistogramObserver"]


class MinMaxObserver(RunningExtremes):
    """Running min and max (asymmetric ranges), per tensor or per channel (keeps ``axis``).

    :meth:`minmax` returns ``(min, max)``; :meth:`compute_amax` (``"max"`` only) returns
    ``max(-min, max)``.

    Args:
        axis: channel axis to keep (per-channel ranges); ``None`` for one range.
    """

    reductions = {"min": "min", "max": "max"}

    @torch.no_grad()
    def collect(self, x: Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        if self.axis is None:
            lo, hi = torch.aminmax(x)
        else:
            axis = self.axis % x.dim()
            lo, hi = torch.aminmax(x.movedim(axis, 0).reshape(x.shape[axis], -1), dim=1)
        self._update({"min": lo, "max": hi}, x.numel())

    def minmax(self) -> tuple[Tensor, Tensor]:
        """``(min, max)`` seen so far (float32 scalars, or per-channel vectors)."""
        return self._stat("min"), self._stat("max")

    def compute_amax(
        self,
        method: str = "max",
        *,
        percentile: float = 99.99,
        bits: int = 8,
        unsigned: bool = False,
    ) -> Tensor:
        _check_read(method, percentile, bits)
        if method != "max":
            raise ConfigError(f"MinMaxObserver reads only 'max', not {method!r}")
        lo, hi = self.minmax()
        return torch.maximum(-lo, hi)


class HistogramObserver(PowerOfTwoHistogram):
    """Signed histogram over ``[-R, R]`` for asymmetric ranges (``--act-method histogram``).

    ``R`` is a growing power of two and zero is the edge between bins ``n/2 - 1`` and ``n/2``, so
    growth merges bins exactly as in :class:`HistogramCalibrator`. (``torch.histc`` bins
    ``x + R``, so a value within one float ulp of an edge may land in the neighbouring bin.)
    :meth:`minmax` reads ``(min, max)``:

    * ``"percentile"``: ``min`` = left edge of the first bin where the CDF exceeds
      ``1 - p/100``, ``max`` = right edge of the first bin where it reaches ``p/100``;
    * ``"mse"`` (default): the affine range (:func:`qparams_from_minmax`) minimising
      ``sum count_i (fq(c_i) - c_i)^2`` over bin centres ``c_i``, searched over bin edges by
      coordinate descent (best ``max`` for the current ``min``, then best ``min``, until stable),
      starting from the full range. This is the same objective as torch.ao's HistogramObserver,
      with a different search.

    Both are clipped to the exact running ``[min, max]``.

    Args:
        num_bins: an even number of bins.
    """

    signed_bins = True

    def reset(self) -> None:
        super().reset()
        self._min, self._max = math.inf, -math.inf

    @torch.no_grad()
    def collect(self, x: Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x.float()))
        _finite(lo + hi)
        m = max(-lo, hi)
        rng = max(_pow2_at_least(m) if m > 0 else 0.0, self._range)
        if rng > 0:
            hist = _histc(x, self.num_bins, -rng, rng)
        else:
            hist = self._zeros_hist(x.numel(), x.device)
        self._absorb(hist, rng, x.numel())
        self._min, self._max = min(self._min, lo), max(self._max, hi)

    def minmax(
        self, method: str = "mse", *, percentile: float = 99.99, bits: int = 8
    ) -> tuple[Tensor, Tensor]:
        """``(min, max)`` (float32 scalars) read with ``"mse"``, ``"percentile"`` or ``"max"``."""
        if method not in ("max", "percentile", "mse"):
            raise ConfigError(
                f"HistogramObserver reads 'max', 'percentile' or 'mse', not {method!r}"
            )
        _check_read(method, percentile, bits)
        if self._count == 0:
            raise _no_data()
        lo, hi = self._min, self._max
        if method != "max" and self._range > 0:
            h, edges = self._hist.double(), self.bin_edges.to(self._hist.device)
            if method == "percentile":
                cum = torch.cumsum(h, 0)
                total = float(cum[-1])
                lo_i = int(torch.nonzero(cum > total * (1 - percentile / 100.0) * (1 + 1e-12))[0])
                hi_i = int(torch.nonzero(cum >= total * percentile / 100.0 * (1 - 1e-12))[0])
                lo, hi = float(edges[lo_i]), float(edges[hi_i + 1])
            else:
                lo, hi = _minmax_mse(h, edges, bits)
            lo, hi = max(lo, self._min), min(hi, self._max)
        return torch.tensor(lo), torch.tensor(hi)

    def compute_amax(
        self,
        method: str = "max",
        *,
        percentile: float = 99.99,
        bits: int = 8,
        unsigned: bool = False,
    ) -> Tensor:
        lo, hi = self.minmax(method, percentile=percentile, bits=bits)
        return torch.maximum(-lo, hi)

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        state["min"] = torch.tensor(self._min, dtype=torch.float64)
        state["max"] = torch.tensor(self._max, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._min, self._max = float(state["min"]), float(state["max"])

    def _maxed(self) -> list[float]:
        return [-self._min, self._max]

    def _set_maxed(self, values: list[float]) -> None:
        self._min, self._max = -values[0], values[1]


def _affine_err(lo: Tensor, hi: Tensor, c: Tensor, w: Tensor, bits: int) -> Tensor:
    """``sum_i w_i (fq(c_i) - c_i)^2`` for each affine range ``(lo[k], hi[k])``."""
    qmin, qmax = qrange(bits, signed=False)
    errs = []
    for lo_, hi_ in zip(lo.split(max(1, _WORK // c.numel())), hi.split(max(1, _WORK // c.numel()))):
        scale, zp = qparams_from_minmax(lo_, hi_, bits)
        scale, zp = scale.double()[:, None], zp.double()[:, None]
        xq = (quantize(c[None], scale, zp, qmin, qmax) - zp) * scale
        errs.append(((xq - c) ** 2 * w).sum(1))
    return torch.cat(errs)


def _minmax_mse(h: Tensor, edges: Tensor, bits: int) -> tuple[float, float]:
    """Coordinate-descent search of the affine range minimising the histogram's squared error."""
    centres = (edges[1:] + edges[:-1]) / 2
    nz = torch.nonzero(h)[:, 0]
    c, w = centres[nz], h[nz]
    first, last = float(edges[int(nz[0])]), float(edges[int(nz[-1]) + 1])
    half = h.numel() // 2
    lo_c = edges[: half + 1][edges[: half + 1] >= min(first, 0.0)]
    hi_c = edges[half:][edges[half:] <= max(last, 0.0)]
    lo, hi = lo_c[0], hi_c[-1]
    for _ in range(16):
        hi_new = hi_c[int(torch.argmin(_affine_err(lo.expand_as(hi_c), hi_c, c, w, bits)))]
        lo_new = lo_c[int(torch.argmin(_affine_err(lo_c, hi_new.expand_as(lo_c), c, w, bits)))]
        if bool(lo_new == lo) and bool(hi_new == hi):
            break
        lo, hi = lo_new, hi_new
    return float(lo), float(hi)

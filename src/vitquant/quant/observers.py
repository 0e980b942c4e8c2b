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
import torch.distributed as dist
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from .calibrators import (
    _WORK,
    Calibrator,
    _check_read,
    _dist_device,
    _dist_on,
    _finite,
    _histc,
    _no_data,
    _pow2_at_least,
    _rebin,
)
from .primitives import qparams_from_minmax, qrange, quantize

__all__ = ["MinMaxObserver", "HistogramObserver"]


class MinMaxObserver(Calibrator):
    """Running min and max (asymmetric ranges), per tensor or per channel (keeps ``axis``).

    :meth:`minmax` returns ``(min, max)``; :meth:`compute_amax` (``"max"`` only) returns
    ``max(-min, max)``.
    """

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.reset()

    def reset(self) -> None:
        self._min: Tensor | None = None
        self._max: Tensor | None = None
        self._count = 0

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
        lo, hi = lo.float(), hi.float()
        _finite(torch.stack([lo, hi]))
        if self._min is None or self._max is None:
            self._min, self._max = lo, hi
        elif self._min.shape != lo.shape:
            raise ConfigError(
                f"MinMaxObserver(axis={self.axis}) saw {lo.numel()} channels after "
                f"{self._min.numel()}"
            )
        else:
            self._min = torch.minimum(self._min, lo.to(self._min.device))
            self._max = torch.maximum(self._max, hi.to(self._max.device))
        self._count += x.numel()

    def minmax(self) -> tuple[Tensor, Tensor]:
        """``(min, max)`` seen so far (float32 scalars, or per-channel vectors)."""
        if self._min is None or self._max is None:
            raise _no_data()
        return self._min.clone(), self._max.clone()

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

    def state_dict(self) -> dict[str, Tensor]:
        state = {"count": torch.tensor(self._count, dtype=torch.int64)}
        if self._min is not None and self._max is not None:
            state["min"], state["max"] = self._min.clone(), self._max.clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._count = int(state["count"])
        self._min = state["min"].float().clone() if "min" in state else None
        self._max = state["max"].float().clone() if "max" in state else None

    def all_reduce(self) -> None:
        if not _dist_on():
            return
        dev = _dist_device(self._min if self._min is not None else torch.zeros(()))
        meta = torch.tensor([-1 if self._min is None else self._min.numel()], device=dev)
        dist.all_reduce(meta, op=dist.ReduceOp.MAX)
        count = torch.tensor([self._count], dtype=torch.int64, device=dev)
        dist.all_reduce(count)
        self._count = int(count)
        if int(meta) < 0:
            return
        shape = () if self.axis is None else (int(meta),)
        if self._min is None or self._max is None:
            lo = torch.full(shape, math.inf, device=dev)
            hi = torch.full(shape, -math.inf, device=dev)
        else:
            lo, hi = self._min.to(dev), self._max.to(dev)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        self._min, self._max = lo, hi


class HistogramObserver(Calibrator):
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

    def __init__(self, num_bins: int = 2048) -> None:
        if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 2 or num_bins % 2:
            raise ConfigError(f"num_bins={num_bins!r} must be an even integer >= 2")
        self.num_bins = int(num_bins)
        self.reset()

    def reset(self) -> None:
        self._hist = torch.zeros(self.num_bins, dtype=torch.int64)
        self._range = 0.0
        self._min, self._max = math.inf, -math.inf
        self._count = 0

    @property
    def hist(self) -> Tensor:
        """Bin counts (int64, ``[num_bins]``)."""
        return self._hist

    @property
    def bin_edges(self) -> Tensor:
        """``num_bins + 1`` edges (float64) from ``-R`` to ``R``."""
        return torch.linspace(-self._range, self._range, self.num_bins + 1, dtype=torch.float64)

    @torch.no_grad()
    def collect(self, x: Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x.float()))
        _finite(lo + hi)
        m = max(-lo, hi)
        rng = max(_pow2_at_least(m) if m > 0 else 0.0, self._range)
        half = self.num_bins // 2
        if rng > 0:
            hist = _histc(x, self.num_bins, -rng, rng)
        else:
            hist = torch.zeros(self.num_bins, dtype=torch.int64, device=x.device)
            hist[half] = x.numel()
        if self._range > 0 and rng > self._range:
            self._hist = _rebin(self._hist, round(rng / self._range), half)
        self._hist = self._hist.to(hist.device) + hist
        self._range = rng
        self._min, self._max = min(self._min, lo), max(self._max, hi)
        self._count += x.numel()

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
        return {
            "hist": self._hist.clone(),
            "range": torch.tensor(self._range, dtype=torch.float64),
            "min": torch.tensor(self._min, dtype=torch.float64),
            "max": torch.tensor(self._max, dtype=torch.float64),
            "count": torch.tensor(self._count, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["hist"].shape != (self.num_bins,):
            raise CheckpointError(
                f"histogram state has {state['hist'].numel()} bins, this observer {self.num_bins}"
            )
        self._hist = state["hist"].detach().long().clone()
        self._range = float(state["range"])
        self._min, self._max = float(state["min"]), float(state["max"])
        self._count = int(state["count"])

    def all_reduce(self) -> None:
        if not _dist_on():
            return
        dev = _dist_device(self._hist)
        stats = torch.tensor([self._range, -self._min, self._max], dtype=torch.float64, device=dev)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        rng = float(stats[0])
        hist = self._hist.to(dev)
        if self._range > 0 and rng > self._range:
            hist = _rebin(hist, round(rng / self._range), self.num_bins // 2)
        dist.all_reduce(hist)
        count = torch.tensor([self._count], dtype=torch.int64, device=dev)
        dist.all_reduce(count)
        self._hist, self._range = hist, rng
        self._min, self._max, self._count = -float(stats[1]), float(stats[2]), int(count)


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

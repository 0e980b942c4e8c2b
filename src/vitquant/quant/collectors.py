"""The statistics-collector protocol, and the two running statistics every collector builds on.

Shared by the calibrators (:mod:`vitquant.quant.calibrators`, NVIDIA pytorch-quantization's
``max`` / histogram calibrators) and the observers (:mod:`vitquant.quant.observers`, the DiffQ
seed's ``minmax`` / ``histogram`` activation observers):

* :class:`Calibrator` -- the protocol: ``collect`` batches, read ``compute_amax``, ``reset``,
  ``state_dict`` / ``load_state_dict`` (plain tensors), ``all_reduce`` across ranks;
* :class:`RunningExtremes` -- elementwise running minima / maxima, per tensor or per channel
  (``MaxCalibrator``: ``amax``; ``MinMaxObserver``: ``min`` and ``max``);
* :class:`PowerOfTwoHistogram` -- a fixed number of bins over a range ``R`` that is always a
  power of two, so that growing it by ``k = 2^n`` merges every ``k`` bins exactly into one
  (``HistogramCalibrator``: ``|x|`` over ``[0, R]``; ``HistogramObserver``: ``x`` over
  ``[-R, R]``, zero on the middle edge).

Both running statistics all-reduce *exactly* across ``torch.distributed`` ranks (a no-op without
a process group; ranks that saw no data take part), so a statistic gathered on N ranks equals the
one gathered on all the data in one process.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from vitquant.errors import CheckpointError, ConfigError, VitquantError

__all__ = [
    "CalibrationError",
    "NonFiniteError",
    "Calibrator",
    "RunningExtremes",
    "PowerOfTwoHistogram",
]

_CHUNK = 1 << 24  # float32 histc counts stay exact below 2^24 per call


class CalibrationError(VitquantError):
    """Calibration cannot produce a range (no data seen, or unusable data)."""


class NonFiniteError(CalibrationError):
    """The collected tensor holds NaN or inf; callers re-raise it with the module's name."""


def _finite(value: float | Tensor, what: str = "calibration data") -> None:
    ok = math.isfinite(value) if isinstance(value, float) else bool(torch.isfinite(value).all())
    if not ok:
        raise NonFiniteError(f"{what} contains NaN or inf")


def _no_data() -> CalibrationError:
    return CalibrationError("calibration saw no data: call collect() on some batches first")


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dist_device(t: Tensor) -> torch.device:
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _sum_count(count: int, device: torch.device) -> int:
    """``count`` summed over all ranks."""
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t)


def _rebin(hist: Tensor, k: int, centre: int = 0) -> Tensor:
    """Merges every ``k`` bins into one, keeping the edge at index ``centre`` fixed (exact)."""
    if k == 1:
        return hist
    idx = torch.arange(hist.numel(), device=hist.device) - centre
    idx = torch.div(idx, k, rounding_mode="floor") + centre
    return torch.zeros_like(hist).index_add_(0, idx, hist)


def _pow2_at_least(m: float) -> float:
    r = 2.0 ** math.ceil(math.log2(m))
    return r * 2.0 if r < m else r


def _histc(a: Tensor, bins: int, lo: float, hi: float) -> Tensor:
    """Exact int64 histogram of ``a`` over ``[lo, hi]`` (``torch.histc`` in exact-count chunks)."""
    if not a.is_floating_point() or a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()
    if a.numel() <= _CHUNK:
        return torch.histc(a, bins=bins, min=lo, max=hi).round_().long()
    out = torch.zeros(bins, dtype=torch.int64, device=a.device)
    for part in a.reshape(-1).split(_CHUNK):
        out += torch.histc(part, bins=bins, min=lo, max=hi).round_().long()
    return out


class Calibrator:
    """Base class: ``collect`` batches, then ``compute_amax``; state is a dict of plain tensors."""

    def collect(self, x: Tensor) -> None:
        """Accumulates statistics of ``x`` (detached, no gradient)."""
        raise NotImplementedError

    def compute_amax(
        self,
        method: str = "max",
        *,
        percentile: float = 99.99,
        bits: int = 8,
        unsigned: bool = False,
    ) -> Tensor:
        """Reads ``amax`` (a scalar, or a per-channel vector) with ``method``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forgets everything collected."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        """Statistics as plain tensors (for resuming or gathering)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restores :meth:`state_dict`."""
        raise NotImplementedError

    def all_reduce(self) -> None:
        """Combines statistics across ``torch.distributed`` ranks; no-op without a process group."""

    @property
    def count(self) -> int:
        """Number of values collected so far."""
        return int(getattr(self, "_count", 0))


class RunningExtremes(Calibrator):
    """Running elementwise extremes of float32 tensors, per tensor or per channel (keeps ``axis``).

    Subclasses name their statistics in :attr:`reductions` and feed them with :meth:`_update`;
    state dicts hold ``count`` plus one tensor per statistic once data has been seen.

    Args:
        axis: channel axis to keep (one value per channel); ``None`` for scalars.
    """

    #: statistic name -> ``"min"`` or ``"max"`` (how it accumulates and all-reduces)
    reductions: ClassVar[dict[str, str]] = {}

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.reset()

    def reset(self) -> None:
        self._stats: dict[str, Tensor] | None = None
        self._count = 0

    def _update(self, new: dict[str, Tensor], count: int) -> None:
        """Folds one batch's statistics (same keys as :attr:`reductions`) over ``count`` values."""
        new = {k: v.float() for k, v in new.items()}
        _finite(torch.stack(list(new.values())))
        if self._stats is None:
            self._stats = new
        else:
            had, got = next(iter(self._stats.values())), next(iter(new.values()))
            if had.shape != got.shape:
                raise ConfigError(
                    f"{type(self).__name__}(axis={self.axis}) saw {got.numel()} channels after "
                    f"{had.numel()}"
                )
            fold = {"min": torch.minimum, "max": torch.maximum}
            self._stats = {
                k: fold[op](self._stats[k], new[k].to(self._stats[k].device))
                for k, op in self.reductions.items()
            }
        self._count += count

    def _stat(self, name: str) -> Tensor:
        """A copy of one statistic; :class:`CalibrationError` before any data."""
        if self._stats is None:
            raise _no_data()
        return self._stats[name].clone()

    def state_dict(self) -> dict[str, Tensor]:
        state = {"count": torch.tensor(self._count, dtype=torch.int64)}
        if self._stats is not None:
            state.update({k: v.clone() for k, v in self._stats.items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._count = int(state["count"])
        if all(k in state for k in self.reductions):
            self._stats = {k: state[k].detach().float().clone() for k in self.reductions}
        else:
            self._stats = None

    def all_reduce(self) -> None:
        if not _dist_on():
            return
        ref = next(iter(self._stats.values())) if self._stats is not None else torch.zeros(())
        dev = _dist_device(ref)
        numel = torch.tensor([-1 if self._stats is None else ref.numel()], device=dev)
        dist.all_reduce(numel, op=dist.ReduceOp.MAX)
        self._count = _sum_count(self._count, dev)
        if int(numel) < 0:  # no rank saw data
            return
        shape = () if self.axis is None else (int(numel),)
        reduced = {}
        for k, op in self.reductions.items():
            if self._stats is not None:
                t = self._stats[k].to(dev)
            else:  # the identity of the reduction: this rank saw no data
                t = torch.full(shape, math.inf if op == "min" else -math.inf, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
            reduced[k] = t
        self._stats = reduced


class PowerOfTwoHistogram(Calibrator):
    """``num_bins`` int64 counts over a range ``R`` (0 until a nonzero value, then a power of two).

    Zero sits on the edge at index :attr:`centre`: 0 for histograms of magnitudes over ``[0, R]``,
    ``num_bins / 2`` for signed histograms over ``[-R, R]`` (:attr:`signed_bins`). Subclasses bin
    each batch over the grown range and hand it to :meth:`_absorb`; they may keep scalars that are
    all-reduced with ``MAX`` alongside the range (:meth:`_maxed` / :meth:`_set_maxed`).

    Args:
        num_bins: number of bins (an even number when :attr:`signed_bins`).
    """

    #: signed histogram over ``[-R, R]`` instead of magnitudes over ``[0, R]``
    signed_bins: ClassVar[bool] = False

    def __init__(self, num_bins: int = 2048) -> None:
        even = self.signed_bins
        if (
            isinstance(num_bins, bool)
            or int(num_bins) != num_bins
            or num_bins < 2
            or (even and num_bins % 2)
        ):
            raise ConfigError(
                f"num_bins={num_bins!r} must be an {'even ' if even else ''}integer >= 2"
            )
        self.num_bins = int(num_bins)
        self.reset()

    def reset(self) -> None:
        self._hist = torch.zeros(self.num_bins, dtype=torch.int64)
        self._range = 0.0  # upper edge R; 0 until a nonzero value arrives
        self._count = 0

    @property
    def centre(self) -> int:
        """Index of the bin edge at zero."""
        return self.num_bins // 2 if self.signed_bins else 0

    @property
    def hist(self) -> Tensor:
        """Bin counts (int64, ``[num_bins]``)."""
        return self._hist

    @property
    def bin_edges(self) -> Tensor:
        """``num_bins + 1`` edges (float64) from 0 (or ``-R``) to the current range ``R``."""
        lo = -self._range if self.signed_bins else 0.0
        return torch.linspace(lo, self._range, self.num_bins + 1, dtype=torch.float64)

    def _zeros_hist(self, count: int, device: torch.device) -> Tensor:
        """The histogram of ``count`` exact zeros (range 0)."""
        hist = torch.zeros(self.num_bins, dtype=torch.int64, device=device)
        hist[self.centre] = count
        return hist

    def _absorb(self, hist: Tensor, rng: float, count: int) -> None:
        """Adds a histogram with range ``rng`` (0 or a power of two), growing as needed."""
        new = max(self._range, rng)
        if self._range > 0 and new > self._range:
            self._hist = _rebin(self._hist, round(new / self._range), self.centre)
        if rng > 0 and new > rng:
            hist = _rebin(hist, round(new / rng), self.centre)
        self._range = new
        self._hist = self._hist.to(hist.device) + hist
        self._count += count

    def _maxed(self) -> list[float]:
        """Scalars of the subclass all-reduced with ``MAX`` alongside the range."""
        return []

    def _set_maxed(self, values: list[float]) -> None:
        """Stores the all-reduced :meth:`_maxed` values."""

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "hist": self._hist.clone(),
            "range": torch.tensor(self._range, dtype=torch.float64),
            "count": torch.tensor(self._count, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        hist = state["hist"]
        if hist.shape != (self.num_bins,):
            raise CheckpointError(
                f"histogram state has {hist.numel()} bins, this {type(self).__name__} "
                f"{self.num_bins}"
            )
        self._hist = hist.detach().long().clone()
        self._range = float(state["range"])
        self._count = int(state["count"])

    def all_reduce(self) -> None:
        if not _dist_on():
            return
        dev = _dist_device(self._hist)
        maxed = torch.tensor([self._range, *self._maxed()], dtype=torch.float64, device=dev)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        rng = float(maxed[0])
        hist = self._hist.to(dev)
        if self._range > 0 and rng > self._range:
            hist = _rebin(hist, round(rng / self._range), self.centre)
        dist.all_reduce(hist)
        self._hist, self._range = hist, rng
        self._count = _sum_count(self._count, dev)
        self._set_maxed(maxed[1:].tolist())

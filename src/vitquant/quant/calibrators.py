"""Calibrators: collect activation statistics, then read a clipping range (``amax``) from them.

The methods are those of NVIDIA pytorch-quantization (``calib/max.py``, ``calib/histogram.py``)
that FasterTransformer's ViT toolkit calibrates with, re-derived from their descriptions:

* ``max`` -- running ``max |x|`` (:class:`MaxCalibrator`, per tensor or per channel);
* ``percentile`` -- the edge of the bin where the CDF of ``|x|`` reaches ``p / 100``;
* ``mse`` -- the bin centre (from bin 128 up) minimising ``sum count_i (fq(c_i; amax) - c_i)^2``;
* ``entropy`` -- TensorRT's KL-divergence search (Migacz, "8-bit Inference with TensorRT",
  GTC 2017).

The last three read one histogram of ``|x|`` (:class:`HistogramCalibrator`, 2048 bins) that grows
across batches. Growth differs from pytorch-quantization (which appends bins of the first batch's
width): here the number of bins is fixed and the range ``[0, R]`` is always a power of two, so
when a batch exceeds ``R`` the range grows by ``k = 2^n`` and every ``k`` old bins merge exactly
into one new bin. The result is *exactly* the histogram of all the data with range ``R``, whatever
the batch order or how the batches were split across ranks (which is what makes
:meth:`HistogramCalibrator.all_reduce` exact). The cost: the data's max lies in ``(R/2, R]``, so
1024 to 2048 bins are in use.

For asymmetric activation ranges at evaluation time the observers live in
:mod:`vitquant.quant.observers` (``MinMaxObserver``, ``HistogramObserver``) and are re-exported
here.

Every collector skips gradients, raises :class:`NonFiniteError` on NaN/inf, and all-reduces its
statistics across ``torch.distributed`` ranks (a no-op without a process group). The protocol
(:class:`Calibrator`) and the running statistics the calibrators and observers share (growth,
state dicts, all-reduce) live in :mod:`vitquant.quant.collectors`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vitquant.errors import ConfigError
from vitquant.quant.collectors import (
    CalibrationError,
    Calibrator,
    NonFiniteError,
    PowerOfTwoHistogram,
    RunningExtremes,
    _finite,
    _histc,
    _no_data,
    _pow2_at_least,
)
from vitquant.quant.granularity import PerChannel
from vitquant.quant.primitives import check_bits, qrange, quantize

if TYPE_CHECKING:
    from vitquant.quant.observers import HistogramObserver, MinMaxObserver

__all__ = [
    "CALIBRATION_METHODS",
    "MSE_START_BIN",
    "CalibrationError",
    "NonFiniteError",
    "Calibrator",
    "MaxCalibrator",
    "HistogramCalibrator",
    "MinMaxObserver",
    "HistogramObserver",
    "make_calibrator",
    "compute_amax",
    "amax_from_histogram",
]

CALIBRATION_METHODS = ("max", "percentile", "mse", "entropy")
MSE_START_BIN = 128
_WORK = 1 << 21  # elements per vectorised block in the readers


def _check_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"unknown calibration method {method!r}: use one of {', '.join(CALIBRATION_METHODS)}"
        )


def _check_read(method: str, percentile: float, bits: int) -> None:
    _check_method(method)
    if not 0.0 < float(percentile) <= 100.0:
        raise ConfigError(f"percentile={percentile!r} must be in (0, 100]")
    check_bits(bits)


class MaxCalibrator(RunningExtremes):
    """Running ``max |x|``, per tensor (``axis=None``) or per channel (keeps ``axis``).

    Args:
        axis: channel axis to keep (per-channel amax); ``None`` for one scalar.
    """

    reductions = {"amax": "max"}

    @torch.no_grad()
    def collect(self, x: Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        a = x.abs().amax() if self.axis is None else PerChannel(self.axis).reduce_amax(x)
        self._update({"amax": a}, x.numel())

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
            raise ConfigError(
                f"MaxCalibrator reads only 'max'; use make_calibrator({method!r}) for a histogram"
            )
        return self._stat("amax")


def _magnitude(x: Tensor, unsigned: bool) -> Tensor:
    """``|x|`` (or ``max(x, 0)``) as a float tensor."""
    a = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    return a.clamp(min=0) if unsigned else a.abs()


_SCRATCH: dict[str, Tensor] = {}


def _scratch(name: str, numel: int, dtype: torch.dtype) -> Tensor:
    """A reused CPU buffer of at least ``numel`` elements (avoids a fresh allocation per batch)."""
    buf = _SCRATCH.get(name)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _bins_cpu(x: Tensor, bins: int, rng: float, unsigned: bool, top: bool) -> Tensor:
    """Exact histogram of ``|x|`` over ``[0, rng]`` for float32 CPU tensors.

    ``rng`` and ``bins`` are powers of two, so ``|x| * bins / rng`` is exact and truncating it to an
    integer is the bin index; ``torch.bincount`` then counts (several times faster than
    ``torch.histc`` on CPU). ``top``: some value may equal ``rng`` (it belongs to the last bin).
    """
    buf = _scratch("f", x.numel(), torch.float32).view(x.shape)
    torch.mul(x, bins / rng, out=buf)
    buf.clamp_(min=0) if unsigned else buf.abs_()
    idx = _scratch("i", x.numel(), torch.int32).view(x.shape)
    idx.copy_(buf)
    if top:
        idx.clamp_(max=bins - 1)
    return torch.bincount(idx.view(-1), minlength=bins)


class HistogramCalibrator(PowerOfTwoHistogram):
    """Histogram of ``|x|`` over ``[0, R]`` with ``num_bins`` bins; ``R`` a growing power of two.

    A batch costs a ``torch.aminmax`` pass (growth, NaN/inf check) and one binning pass
    (``torch.bincount`` of exact bin indices on CPU float32, ``torch.histc`` elsewhere).
    ``compute_amax("max")`` reads the right edge of the last nonzero bin (at most one bin width
    above the true max; use :class:`MaxCalibrator` for the exact max).

    Args:
        num_bins: number of bins (2048 as pytorch-quantization).
        unsigned: the tensor is meant for an unsigned quantizer: negative values are counted as
            0 (what the quantizer maps them to) instead of by magnitude, and :meth:`compute_amax`
            reads with an unsigned grid.
    """

    def __init__(self, num_bins: int = 2048, unsigned: bool = False) -> None:
        self.unsigned = bool(unsigned)
        super().__init__(num_bins)

    @torch.no_grad()
    def collect(self, x: Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        _finite(lo + hi)
        m = max(hi, 0.0) if self.unsigned else max(-lo, hi)
        rng = max(_pow2_at_least(m) if m > 0 else 0.0, self._range)
        n = x.numel()
        if rng == 0:
            hist = self._zeros_hist(n, x.device)
        elif (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.num_bins & (self.num_bins - 1) == 0
            and self.num_bins / rng < 2.0**100
        ):
            hist = _bins_cpu(x, self.num_bins, rng, self.unsigned, top=m == rng)
        else:
            hist = _histc(_magnitude(x, self.unsigned), self.num_bins, 0.0, rng)
        self._absorb(hist, rng, n)

    def merge(self, other: HistogramCalibrator) -> None:
        """Adds another calibrator's statistics (same ``num_bins``) into this one, exactly."""
        if other.num_bins != self.num_bins:
            raise ConfigError(f"cannot merge {other.num_bins} bins into {self.num_bins}")
        self._absorb(other._hist.clone(), other._range, other._count)

    def compute_amax(
        self,
        method: str = "max",
        *,
        percentile: float = 99.99,
        bits: int = 8,
        unsigned: bool = False,
    ) -> Tensor:
        _check_read(method, percentile, bits)
        if self._count == 0:
            raise _no_data()
        if self._range == 0:  # only zeros seen
            return torch.zeros((), device=self._hist.device)
        return amax_from_histogram(
            self._hist,
            self.bin_edges.to(self._hist.device),
            method,
            percentile=percentile,
            bits=bits,
            unsigned=unsigned or self.unsigned,
        )


def amax_from_histogram(
    hist: Tensor,
    bin_edges: Tensor,
    method: str,
    *,
    percentile: float = 99.99,
    bits: int = 8,
    unsigned: bool = False,
) -> Tensor:
    """Reads ``amax`` from a histogram of ``|x|`` (pure function).

    Args:
        hist: ``[n]`` bin counts of ``|x|``.
        bin_edges: ``[n + 1]`` increasing edges, ``bin_edges[0] = 0``.
        method: ``"max"`` (right edge of the last nonzero bin), ``"percentile"`` (right edge of
            the first bin where the CDF reaches ``percentile / 100``; pytorch-quantization returns
            that bin's left edge, one bin lower), ``"mse"`` or ``"entropy"`` (see the module
            docstring and :func:`_amax_mse`, :func:`_amax_entropy`).
        percentile: in ``(0, 100]``.
        bits: quantizer bits (mse, entropy).
        unsigned: unsigned grid (``2^bits - 1`` steps) instead of signed (``2^(bits-1) - 1``).

    Returns:
        A float32 scalar tensor.
    """
    _check_read(method, percentile, bits)
    if bin_edges.numel() != hist.numel() + 1:
        raise ConfigError(f"{bin_edges.numel()} bin edges do not fit {hist.numel()} bins")
    h = hist.detach().double()
    edges = bin_edges.detach().double().to(h.device)
    total = float(h.sum())
    if not total > 0:
        raise _no_data()
    if method == "max":  # right edge of the last nonzero bin
        amax = edges[int(torch.nonzero(h)[-1]) + 1]
    elif method == "percentile":
        # counts are integers: the relative slack only absorbs the rounding of p / 100 * total
        target = torch.tensor([total * percentile / 100.0 * (1 - 1e-12)], dtype=h.dtype)
        target = target.to(h.device)
        idx = min(int(torch.searchsorted(torch.cumsum(h, 0), target)), h.numel() - 1)
        amax = edges[idx + 1]
    elif method == "mse":
        amax = _amax_mse(h, edges, bits, unsigned)
    else:
        amax = _amax_entropy(h, edges, bits, unsigned)
    return amax.float()


def _amax_mse(h: Tensor, edges: Tensor, bits: int, unsigned: bool) -> Tensor:
    """Bin centre ``c_j`` (``j >= 128``) minimising ``sum_i h_i (fq(c_i; c_j) - c_i)^2``.

    ``fq`` is the symmetric quantizer with ``scale = amax / qmax``; the first minimum wins.
    """
    centres = (edges[1:] + edges[:-1]) / 2
    cands = centres[min(MSE_START_BIN, h.numel() - 1) :]
    keep = h > 0
    c, w = centres[keep], h[keep]
    qmin, qmax = qrange(bits, signed=not unsigned)
    errs = []
    for part in cands.split(max(1, _WORK // c.numel())):
        scale = (part / qmax)[:, None]
        xq = quantize(c[None], scale, 0, qmin, qmax) * scale
        errs.append(((xq - c) ** 2 * w).sum(1))
    return cands[int(torch.argmin(torch.cat(errs)))]


def _amax_entropy(h: Tensor, edges: Tensor, bits: int, unsigned: bool) -> Tensor:
    """TensorRT's KL search, returning ``edges[i]`` of the best candidate ``i``.

    As in pytorch-quantization, ``h[0]`` is first replaced by ``h[1]`` (so a spike of exact zeros
    does not dominate). For each ``i`` in ``min(2^(bits-1), n) .. n``: the reference ``P`` is
    ``h[:i]`` with the outliers ``sum(h[i:])`` added to its last bin; the candidate ``Q`` merges
    ``h[:i]`` into ``m = 2^(bits-1)`` (unsigned ``2^bits``) groups (bin ``j`` goes to group
    ``floor(j m / i)``) and spreads each group's sum evenly over its nonzero bins (zero bins stay
    zero). Both are normalised; ``KL(P || Q) = sum_{P>0} P log(P/Q)`` (``inf`` where ``Q = 0 <
    P``). The last minimum wins.

    Vectorised over all candidates with prefix sums: ``Q`` is constant on a group's nonzero
    bins, so ``sum P log Q`` is a sum over ``m`` groups, and ``sum P log P`` a prefix sum.
    """
    n = h.numel()
    b = h.clone()
    if n > 1:
        b[0] = b[1]
    total = b.sum()
    m = 2 ** (bits - 1 + int(unsigned))

    def prefix(v: Tensor) -> Tensor:  # prefix(v)[k] = sum(v[:k])
        return torch.cat([v.new_zeros(1), torch.cumsum(v, 0)])

    cum, nnz, plogp = prefix(b), prefix((b > 0).to(b.dtype)), prefix(torch.xlogy(b, b))
    groups = torch.arange(m + 1, device=h.device)
    cands = torch.arange(min(2 ** (bits - 1), n), n + 1, device=h.device)
    kls = []
    for i in cands.split(max(1, _WORK // (m + 1))):
        bounds = torch.div(groups[None] * i[:, None] + m - 1, m, rounding_mode="floor")
        gsum = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]
        gnnz = nnz[bounds[:, 1:]] - nnz[bounds[:, :-1]]
        kept = cum[i]
        outliers = total - kept
        last = b[i - 1] + outliers
        # sum_j P_j log P_j: the first i-1 bins from prefix sums, then the last bin.
        p_log_p = plogp[i - 1] - torch.log(total) * cum[i - 1] + torch.xlogy(last, last / total)
        q = gsum / (gnnz.clamp(min=1) * kept.clamp(min=1e-300)[:, None])
        last_group = torch.div((i - 1) * m, i, rounding_mode="floor")[:, None]
        p_group = gsum.scatter_add(1, last_group, outliers[:, None])
        kl = (p_log_p - torch.xlogy(p_group, q).sum(1)) / total
        # outliers moved into an empty last bin, where Q is 0: infinite divergence
        kls.append(torch.where((b[i - 1] == 0) & (outliers > 0), math.inf, kl))
    kl = torch.cat(kls)
    best = kl.numel() - 1 - int(torch.argmin(kl.flip(0)))
    return edges[int(cands[best])]


def make_calibrator(method: str, *, axis: int | None = None, num_bins: int = 2048) -> Calibrator:
    """A calibrator able to read ``method``: ``max`` -> :class:`MaxCalibrator`, else a histogram.

    Raises:
        ConfigError: unknown method, or ``axis`` with a histogram method (per tensor only).
    """
    _check_method(method)
    if method == "max":
        return MaxCalibrator(axis=axis)
    if axis is not None:
        raise ConfigError(f"calibration method {method!r} is per tensor only: use axis=None")
    return HistogramCalibrator(num_bins=num_bins)


def compute_amax(
    x: Tensor,
    method: str,
    *,
    percentile: float = 99.99,
    bits: int = 8,
    unsigned: bool = False,
    num_bins: int = 2048,
) -> Tensor:
    """One-shot: collects ``x`` in a fresh calibrator for ``method`` and reads ``amax``.

    Example:
        >>> compute_amax(torch.tensor([0.5, -2.0]), "max")
        tensor(2.)
    """
    cal = make_calibrator(method, num_bins=num_bins)
    cal.collect(x)
    return cal.compute_amax(method, percentile=percentile, bits=bits, unsigned=unsigned)

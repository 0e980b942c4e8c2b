"""Per-channel activation statistics that measure outliers: :func:`outlier_stats`,
:class:`ChannelStats`, :class:`ChannelHistogram`, and :func:`output_agreement` of two models.

The outlier measure, along the channel axis (the last one of a Linear's input):
``ratio[c] = max|x[..., c]| / P(|x[..., c']|, c' not among the top_k channels by max)``, P the
``percentile`` (99.99). The reference leaves the top channels out because a single channel already
holds more than 0.01% of a tensor's values, so the percentile of the whole tensor would fall inside
the outlier itself. Percentiles come from per-channel histograms of ``log2|x|`` (8 bins per
octave, interpolated): within 1% for smooth distributions, one bin (9%) at worst, in bounded
memory. Used by :mod:`vitquant.models.outliers` (test models) and ``vitquant analyze``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError, DataError

__all__ = ["ChannelHistogram", "ChannelStats", "outlier_stats", "output_agreement"]

_LOG2_LO = -24  # |x| below 2^-24 counts as zero (the first bin)
_PER_OCTAVE = 8
_NUM_BINS = 48 * _PER_OCTAVE  # up to 2^24 (the max per channel is kept exactly)


# --- statistics --------------------------------------------------------------------------------
@dataclass
class ChannelStats:
    """Outlier statistics of one tensor (all batches), channels along one axis.

    Attributes:
        channels: number of channels.
        count: values seen.
        max: max |x|.
        percentile: the ``q``-th percentile of |x| over the whole tensor (what a per-tensor
            percentile calibrator sees).
        ref_percentile: the ``q``-th percentile over the channels outside the top ``top_k``.
        ratio: ``max / ref_percentile`` (the largest channel's ratio).
        top_channels: the ``top_k`` channels with the largest max |x|, largest first.
        top_max: their max |x|.
        top_ratio: their ratios to ``ref_percentile``.
        q: the percentile used.
    """

    channels: int
    count: int
    max: float
    percentile: float
    ref_percentile: float
    ratio: float
    top_channels: list[int]
    top_max: list[float]
    top_ratio: list[float]
    q: float = 99.99

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelStats:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class ChannelHistogram:
    """Streaming per-channel histogram of ``log2|x|`` and per-channel max (bounded memory).

    Args:
        axis: the channel axis of the tensors given to :meth:`update` (default: the last).
    """

    def __init__(self, axis: int = -1) -> None:
        self.axis = axis
        self.counts: Tensor | None = None  # [C, bins]
        self.cmax: Tensor | None = None  # [C]

    def update(self, x: Tensor) -> None:
        """Adds the values of ``x``; NaN or inf raise a :class:`DataError`."""
        x = x.detach()
        a = x.movedim(self.axis, -1).reshape(-1, x.shape[self.axis]).abs().float()
        if not torch.isfinite(a).all():
            raise DataError("NaN or inf in an activation (check the data and the model)")
        c = a.shape[1]
        bins = ((torch.log2(a) - _LOG2_LO) * _PER_OCTAVE).clamp_(0, _NUM_BINS - 1).long()
        bins += torch.arange(c, device=a.device) * _NUM_BINS
        counts = torch.bincount(bins.reshape(-1), minlength=c * _NUM_BINS).view(c, _NUM_BINS)
        counts = counts.to(torch.int32)  # ViT-B: ~240 MB for every point of ft2
        cmax = a.amax(0) if a.shape[0] else a.new_zeros(c)
        if self.counts is None or self.cmax is None:
            self.counts, self.cmax = counts, cmax
        elif self.counts.shape[0] != c:
            raise DataError(f"activation channels changed from {self.counts.shape[0]} to {c}")
        else:
            self.counts += counts
            self.cmax = torch.maximum(self.cmax, cmax)

    def percentile(self, q: float, exclude: Sequence[int] = ()) -> float:
        """The ``q``-th percentile of |x| over the channels not in ``exclude``."""
        if self.counts is None or self.cmax is None:
            raise DataError("no activation was observed")
        keep = torch.ones(self.counts.shape[0], dtype=torch.bool, device=self.counts.device)
        keep[list(exclude)] = False
        hist = self.counts[keep].double().sum(0)
        total = float(hist.sum())
        if total == 0:
            return 0.0
        rank = q / 100.0 * total
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor(rank, dtype=cum.dtype, device=cum.device)))
        b = min(b, _NUM_BINS - 1)
        before = float(cum[b - 1]) if b > 0 else 0.0
        frac = min(max((rank - before) / max(float(hist[b]), 1.0), 0.0), 1.0)
        value = 2.0 ** (_LOG2_LO + (b + frac) / _PER_OCTAVE)
        return min(value, float(self.cmax[keep].max()))

    def stats(self, q: float = 99.99, top_k: int = 4) -> ChannelStats:
        """The :class:`ChannelStats` of everything observed."""
        if self.counts is None or self.cmax is None:
            raise DataError("no activation was observed")
        c = int(self.cmax.numel())
        k = max(1, min(int(top_k), c - 1)) if c > 1 else 0
        order = torch.argsort(self.cmax, descending=True).tolist()
        top = order[: max(k, 1)]
        ref = max(self.percentile(q, order[:k]), 2.0**_LOG2_LO)
        cmax = self.cmax.tolist()
        return ChannelStats(
            channels=c,
            count=int(self.counts.sum(dtype=torch.int64)),
            max=float(cmax[top[0]]),
            percentile=self.percentile(q),
            ref_percentile=ref,
            ratio=cmax[top[0]] / ref,
            top_channels=[int(i) for i in top],
            top_max=[float(cmax[i]) for i in top],
            top_ratio=[cmax[i] / ref for i in top],
            q=float(q),
        )


def _input(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "input", "pixel_values", "x"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise DataError(f"cannot find the input tensor in a batch of type {type(batch).__name__}")


def _stream(
    batches: Iterable[Any], num_batches: int | None, device: torch.device
) -> Iterator[Tensor]:
    """The input tensors of ``batches`` on ``device``; DataError when there is none."""
    count = 0
    for batch in batches:
        if num_batches is not None and count >= num_batches:
            break
        count += 1
        yield _input(batch).to(device)
    if count == 0:
        raise DataError("the data yielded no batches")


def _inputs(batches: Iterable[Any], num_batches: int | None, device: torch.device) -> list[Tensor]:
    return list(_stream(batches, num_batches, device))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    y = model(x)
    return y[0] if isinstance(y, (tuple, list)) else y


def _forward_all(model: nn.Module, inputs: Iterable[Tensor], hooks: list[Any]) -> None:
    """Runs ``inputs`` through ``model`` in eval mode without gradients, then removes ``hooks``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def outlier_stats(
    model: nn.Module,
    batches: Iterable[Any],
    names: Sequence[str] | None = None,
    *,
    top_k: int = 4,
    percentile: float = 99.99,
    num_batches: int | None = None,
) -> dict[str, ChannelStats]:
    """Outlier statistics of the first input of modules over ``batches`` (float forward).

    Args:
        model: any model (evaluated in eval mode, restored after).
        batches: tensors or ``(input, label)`` pairs.
        names: module names (default: every ``nn.Linear``); their first positional input is
            measured, channels along its last axis (a residual ``Add``'s first input is the
            residual stream).
        top_k: channels reported, and left out of ``ref_percentile``.
        percentile: the percentile of |x| (99.99).
        num_batches: stop after this many batches.

    Returns:
        ``{module name: ChannelStats}`` in the model's module order.

    Raises:
        ConfigError: an unknown module name. DataError: no batch, or NaN/inf.
    """
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(f"no module {missing[0]!r} in the model")
    hists = {n: ChannelHistogram() for n in names}
    hooks = [
        modules[n].register_forward_pre_hook(lambda _m, args, h=hists[n]: h.update(args[0]))
        for n in names
    ]
    _forward_all(model, _stream(batches, num_batches, _device(model)), hooks)
    return {n: hists[n].stats(percentile, top_k) for n in names if hists[n].counts is not None}


def output_agreement(
    reference: nn.Module, model: nn.Module, batches: Iterable[Any], num_batches: int | None = None
) -> dict[str, float]:
    """How closely ``model``'s outputs follow ``reference``'s on ``batches``.

    Returns:
        ``rel_error`` (``||y - y_ref|| / ||y_ref||`` over all outputs), ``max_abs_error``, and
        ``agreement`` (fraction of inputs with the same top-1 class).
    """
    err = ref_sq = max_abs = 0.0
    same = total = 0
    modes = (reference.training, model.training)
    reference.eval()
    model.eval()
    try:
        with torch.no_grad():
            for x in _stream(batches, num_batches, _device(model)):
                y_ref = _logits(reference, x.to(_device(reference))).float().to(x.device)
                y = _logits(model, x).float()
                err += float((y - y_ref).pow(2).sum())
                ref_sq += float(y_ref.pow(2).sum())
                max_abs = max(max_abs, float((y - y_ref).abs().max()))
                same += int((y.argmax(-1) == y_ref.argmax(-1)).sum())
                total += int(y.shape[0])
    finally:
        reference.train(modes[0])
        model.train(modes[1])
    return {
        "rel_error": math.sqrt(err / max(ref_sq, 1e-30)),
        "max_abs_error": max_abs,
        "agreement": same / max(total, 1),
    }


# --- injections --------------------------------------------------------------------------------

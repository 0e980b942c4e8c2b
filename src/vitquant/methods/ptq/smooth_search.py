"""SmoothQuant's statistics and per-layer ``α`` search: which layers to smooth, their input
statistics, the smoothing factors and the quantized-output error that scores them.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023, arXiv 2211.10438: per input channel ``j`` of a Linear with input ``X`` and
weight ``W``, ``s_j = max|X_j|^α / max|W_:,j|^(1-α)`` (:func:`smoothing_factors`). Here:

* :func:`_targets`: the (LayerNorm or activation, Linear) pairs whose quantized input can be
  smoothed (:func:`vitquant.quant.reparam.channel_pairs`);
* :class:`_InputStats` / :func:`_collect`: one float pass over the calibration batches, per layer
  the channel maxima ``max|X_j|`` over every token and a uniform sample of the tokens;
* :class:`_LayerSearch`: the relative error ``||Q(X') Q(W')ᵀ - X Wᵀ|| / ||X Wᵀ||`` of the layer's
  quantized output on that sample, with scratch copies of the layer's own quantizers calibrated
  on ``X'`` and ``W'`` (:func:`_fake_quant`), for each ``α`` of the grid (:func:`_grid`,
  :data:`ALPHA_GRID`) and for no smoothing.

Split out of :mod:`vitquant.methods.ptq.smoothquant`, which keeps ``smooth()``, the calibration
pass ``"smooth"`` and the ``SmoothLayer`` records, and re-exports the public names here.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError, DataError
from vitquant.quant.api import forward_batches, quantization_disabled
from vitquant.quant.calibrators import CALIBRATION_METHODS
from vitquant.quant.modules import QuantModule
from vitquant.quant.modules.linear import SMOOTH_BUFFER
from vitquant.quant.quantizers import Quantizer
from vitquant.quant.reparam import PAIR_KINDS, ChannelPair, channel_pairs

__all__ = ["ALPHA_GRID", "smoothing_factors"]

#: The default ``α`` grid of the search (0 to 1 in steps of 0.1).
ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


def smoothing_factors(act_max: Tensor, weight_max: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's ``s = act_max^α / weight_max^(1-α)`` per input channel.

    Channels that never fire (``act_max == 0``) or meet a zero weight column keep ``s = 1``.
    """
    a = act_max.float()
    w = weight_max.float().to(a.device)
    s = a.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s))


# --- statistics ----------------------------------------------------------------------------------
class _InputStats:
    """Per-channel ``max|x|`` over all rows and a uniform sample of ``max_rows`` rows (tokens):
    each row gets a random key and the rows with the smallest keys are kept."""

    def __init__(self, name: str, max_rows: int | None, gen: torch.Generator) -> None:
        self.name, self.max_rows, self.gen = name, max_rows, gen
        self.absmax: Tensor | None = None
        self._rows: list[Tensor] = []
        self._keys: list[Tensor] = []
        self._count = 0

    def add(self, x: Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if not bool(torch.isfinite(x2).all()):
            raise DataError(f"smooth: NaN or inf in the input of {self.name}")
        am = x2.abs().amax(0)
        self.absmax = am if self.absmax is None else torch.maximum(self.absmax, am)
        self._rows.append(x2)
        self._keys.append(torch.rand(x2.shape[0], generator=self.gen).to(x2.device))
        self._count += x2.shape[0]
        if self.max_rows is not None and self._count > 2 * self.max_rows:
            self._compact()

    def _compact(self) -> None:
        rows, keys = torch.cat(self._rows), torch.cat(self._keys)
        if self.max_rows is not None and rows.shape[0] > self.max_rows:
            keep = torch.topk(keys, self.max_rows, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self._rows, self._keys, self._count = [rows], [keys], rows.shape[0]

    def sample(self) -> Tensor | None:
        """The sampled rows ``[R, C]`` (None: the layer saw no data)."""
        if not self._rows:
            return None
        self._compact()
        return self._rows[0]


def _layer_input(pair: ChannelPair, x: Tensor) -> Tensor:
    """What the layer's input quantizer sees (an existing ``smooth_scale`` applied)."""
    s = getattr(pair.consumer, "_buffers", {}).get(SMOOTH_BUFFER)
    return x if s is None else x / s


def _collect(
    model: nn.Module,
    pairs: list[ChannelPair],
    data: Iterable[Any],
    num_batches: int | None,
    max_rows: int | None,
    seed: int,
    progress: bool,
) -> dict[str, _InputStats]:
    gen = torch.Generator().manual_seed(seed)
    stats = {p.name: _InputStats(p.name, max_rows, gen) for p in pairs}
    hooks = [
        p.consumer.register_forward_pre_hook(
            lambda _m, args, p=p: stats[p.name].add(_layer_input(p, args[0]))
        )
        for p in pairs
    ]
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with quantization_disabled(model), torch.no_grad():
            count = forward_batches(model, data, num_batches, dev, progress, "smooth: statistics")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise DataError("smooth: the calibration data yielded no batches")
    return stats


# --- search ------------------------------------------------------------------------------------
def _weight_quantizer(pair: ChannelPair) -> Quantizer | None:
    m = pair.consumer
    if not isinstance(m, QuantModule):
        return None
    for slot, pname in m.quant_weights.items():
        q = getattr(m, slot, None)
        if pname == pair.weight_name and isinstance(q, Quantizer):
            return q
    return None


def _fake_quant(q: Quantizer, t: Tensor, method: str, percentile: float, bins: int) -> Tensor:
    """``t`` through ``q`` (a scratch copy) calibrated on ``t`` alone."""
    q.start_calibration(method, num_bins=bins)
    q.observe(t)
    q.finish_calibration(method, percentile=percentile, reduce=False)
    if q.kind != "uniform":
        return q.fake_quant(t)
    # no gradient needed: the dequantized codes (QParams), without the STE's extra passes
    scale, zero = q.expanded(q.scale, t), q.expanded(q.zero_point, t)
    return q.int_codes(t).sub_(zero).mul_(scale)


class _LayerSearch:
    """Scores factors on one layer: relative error of its quantized output on the sample."""

    def __init__(
        self,
        pair: ChannelPair,
        rows: Tensor,
        act_max: Tensor,
        methods: tuple[str, str],
        percentile: float,
        bins: int,
    ) -> None:
        self.x, self.act_max = rows, act_max
        self.w = getattr(pair.consumer, pair.weight_name).detach().float().to(self.x.device)
        self.weight_max = self.w.abs().amax(0)
        qin = getattr(pair.consumer, pair.input_slot)
        qw = _weight_quantizer(pair)
        self.qin = copy.deepcopy(qin)
        self.qw = copy.deepcopy(qw) if qw is not None else None
        self.method, self.weight_method = methods
        self.percentile, self.bins = percentile, bins
        with torch.no_grad():
            self.ref = self.x @ self.w.t()
        self.ref_norm = float(self.ref.norm()) or 1.0

    @torch.no_grad()
    def error(self, s: Tensor | None) -> float:
        xs = self.x if s is None else self.x / s
        ws = self.w if s is None else self.w * s
        xq = _fake_quant(self.qin, xs, self.method, self.percentile, self.bins)
        wq = ws
        if self.qw is not None:
            wq = _fake_quant(self.qw, ws, self.weight_method, self.percentile, self.bins)
        return float((xq @ wq.t() - self.ref).norm()) / self.ref_norm


def _check_unit(value: object, what: str) -> float:
    """``value`` as a float in ``[0, 1]``, or a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what}={value!r}: use a number in [0, 1] or 'search'")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{what}={value} must be in [0, 1]")
    return float(value)


def _grid(alpha: float | str, alphas: Sequence[float]) -> list[float]:
    """The values of ``α`` to try (checked)."""
    if isinstance(alpha, str) and alpha == "search":
        if not alphas:
            raise ConfigError("alphas: the search needs at least one value")
        return [_check_unit(a, "alphas") for a in alphas]
    return [_check_unit(alpha, "alpha")]


def _targets(model: nn.Module, kinds: Sequence[str]) -> list[ChannelPair]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in PAIR_KINDS]
    if bad or not kinds:
        raise ConfigError(f"unknown smoothing kind(s) {bad or list(kinds)}; use ln and/or act")
    out = []
    for p in channel_pairs(model, kinds):
        q = getattr(p.consumer, p.input_slot, None)
        if not isinstance(q, Quantizer) or q.kind not in ("uniform", "dynamic"):
            continue  # an unquantized (or log2) input has nothing to gain
        if p.kind == "ln" and getattr(p.producer, "weight", None) is None:
            warnings.warn(
                f"smooth: {p.producer_name} has no affine weight; {p.name} left unsmoothed",
                stacklevel=4,
            )
            continue
        out.append(p)
    return out


def _check_method(what: str, method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"unknown calibration {what} {method!r}; use one of {', '.join(CALIBRATION_METHODS)}"
        )

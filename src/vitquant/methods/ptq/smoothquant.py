"""SmoothQuant: migrate activation outliers into the weights, keeping per-tensor integer GEMMs.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023, arXiv 2211.10438. For a Linear with input ``X`` and weight ``W``, per input
channel ``j``::

    s_j = max|X_j|^α / max|W_:,j|^(1-α),    X' = X / s,    W' = W diag(s)    (X' W'ᵀ = X Wᵀ)

so a few activation channels far outside the rest are flattened (their range moves into the
weight's columns, which per-output-channel weight scales absorb better) and a per-tensor
activation quantizer wastes fewer levels. Where ``1 / s`` goes (:mod:`vitquant.quant.reparam`):

* post-LayerNorm inputs (``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1``, kind ``"ln"``): folded
  into the LayerNorm's weight and bias; exact and free at inference;
* the input of ``mlp.fc2`` (after GELU, kind ``"act"``): GELU is not homogeneous, so ``1 / s``
  cannot go into ``fc1``; ``fc2`` gets an explicit ``smooth_scale`` (its input is divided by it
  before the input quantizer) that the int8 runtime folds into the quantization of ``fc2``'s
  input, ``round(x / (s_c * scale))``, so the GEMM stays per-tensor int8.

``α`` is fixed, or searched per layer (``"search"``): every value of a grid, and no smoothing,
scored by the relative error of the layer's quantized output ``||Q(X') Q(W')ᵀ - X Wᵀ|| /
||X Wᵀ||`` on a sample of the calibration tokens, with copies of the layer's own input and
weight quantizers calibrated on ``X'`` and ``W'`` (the config's calibrator); the paper picks one
``α`` per model by hand.

Smoothing runs on a prepared, not yet calibrated model (:func:`smooth`), so that calibration
sees the smoothed activations and the search uses the config's quantizers. Three ways in:

* ``QuantConfig(..., passes=["smooth"], pass_options={"smooth": {"alpha": 0.5}})``: the
  calibration pass :class:`SmoothPass` (registered as ``"smooth"``) runs :func:`smooth` inside
  :func:`vitquant.quant.calibrate`, before the statistics;
* :func:`smooth_and_calibrate`: ``prepare`` (if needed), :func:`smooth`, ``calibrate``;
* :func:`smooth` then :func:`vitquant.quant.calibrate`.

Length: just over 500 lines because the statistics, the per-layer search and the calibration
pass share their records; the folds themselves live in :mod:`vitquant.quant.reparam`.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError, DataError
from vitquant.quant.api import (
    batch_input,
    calibrate,
    get_config,
    named_quantizers,
    prepare,
    quantization_disabled,
)
from vitquant.quant.calibrators import CALIBRATION_METHODS
from vitquant.quant.config import QuantConfig
from vitquant.quant.modules import QuantModule
from vitquant.quant.modules.linear import SMOOTH_BUFFER
from vitquant.quant.passes import CALIBRATION_PASSES, CalibrationPass
from vitquant.quant.quantizers import Quantizer
from vitquant.quant.reparam import PAIR_KINDS, ChannelPair, apply_channel_scale, channel_pairs

__all__ = [
    "ALPHA_GRID",
    "SmoothLayer",
    "SmoothPass",
    "smooth",
    "smooth_and_calibrate",
    "smoothing_factors",
    "smoothing_report",
]

#: The default ``α`` grid of the search (0 to 1 in steps of 0.1).
ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))

_REPORT_ATTR = "_vitquant_smooth"


@dataclass
class SmoothLayer:
    """What :func:`smooth` did to one layer.

    Attributes:
        name: the layer (``blocks.0.attn.qkv``).
        kind: ``"ln"`` (folded into ``producer``) or ``"act"`` (the layer's ``smooth_scale``).
        producer: the LayerNorm (``blocks.0.norm1``) or the activation (``blocks.0.mlp.act``).
        alpha: the migration strength used; None: left unsmoothed (no ``α`` beat it).
        error: relative error of the layer's quantized output with the factors used.
        unsmoothed_error: the same without smoothing.
        scale: the factors ``s`` applied (ones when ``alpha`` is None); not in :meth:`to_dict`.
    """

    name: str
    kind: str
    producer: str
    alpha: float | None
    error: float
    unsmoothed_error: float
    scale: Tensor = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON), with the range of the factors instead of the factors."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "scale"}
        return {**d, "scale_min": float(self.scale.min()), "scale_max": float(self.scale.max())}


def smoothing_factors(act_max: Tensor, weight_max: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's ``s = act_max^α / weight_max^(1-α)`` per input channel.

    Channels that never fire (``act_max == 0``) or meet a zero weight column keep ``s = 1``.
    """
    a = act_max.float()
    w = weight_max.float().to(a.device)
    s = a.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s))


def smoothing_report(model: nn.Module) -> list[SmoothLayer]:
    """The :class:`SmoothLayer` records of every :func:`smooth` run on ``model`` ([] if none)."""
    return list(getattr(model, _REPORT_ATTR, []))


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
    count = 0
    try:
        batches: Iterable[Any] = data
        if progress:
            from tqdm.auto import tqdm

            total = num_batches
            if total is None and hasattr(data, "__len__"):
                total = len(data)  # type: ignore[arg-type]
            batches = tqdm(data, total=total, desc="smooth: statistics", leave=False)
        with quantization_disabled(model), torch.no_grad():
            for batch in batches:
                if num_batches is not None and count >= num_batches:
                    break
                model(batch_input(batch).to(dev))
                count += 1
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


# --- public API --------------------------------------------------------------------------------
def smooth(
    model: nn.Module,
    data: Iterable[Any],
    alpha: float | str = "search",
    *,
    kinds: Sequence[str] = PAIR_KINDS,
    alphas: Sequence[float] = ALPHA_GRID,
    method: str | None = None,
    percentile: float | None = None,
    weight_method: str = "max",
    num_batches: int | None = None,
    max_rows: int | None = 1024,
    seed: int = 0,
    progress: bool = True,
    act_error_ratio: float | None = None,
) -> list[SmoothLayer]:
    """Applies SmoothQuant's migration to a prepared, not yet calibrated model, in place.

    The float function is unchanged (up to float rounding); the post-LayerNorm factors are
    folded into the LayerNorms, the ``fc2`` ones become ``fc2.smooth_scale``. Call
    :func:`vitquant.quant.calibrate` afterwards (or use :func:`smooth_and_calibrate`, or name
    the calibration pass ``"smooth"`` in the config).

    Args:
        model: a model returned by :func:`vitquant.quant.prepare`, not calibrated.
        data: calibration batches (tensors or ``(input, label)`` pairs).
        alpha: the migration strength in ``[0, 1]`` (0.5 in the paper), or ``"search"``: per
            layer, the value of ``alphas`` (or no smoothing) whose quantized layer output is
            closest to the float one.
        kinds: ``"ln"`` (``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1``) and/or ``"act"``
            (``mlp.fc2``).
        alphas: the search grid.
        method, percentile: the activation calibrator of the search (default: the config's).
        weight_method: the weight calibrator of the search (``calibrate``'s default, max).
        num_batches: use only this many batches.
        max_rows: tokens per layer kept for the search (a uniform sample; None: all). The
            channel maxima use every token.
        seed: the sample's seed.
        progress: tqdm progress bars (statistics pass, then layers).
        act_error_ratio: smooth an ``"act"`` layer (``fc2``) only where it brings that layer's
            quantized output error down to this fraction of the unsmoothed error or below (None:
            always). Unlike the LayerNorm folds, an ``fc2`` factor costs the int8 runtime a
            per-channel division in its input quantization, which pays only where ``fc2``'s
            input has outlier channels (the ``robust`` preset uses 0.5).

    Returns:
        One :class:`SmoothLayer` per smoothed layer, in model order (also appended to
        :func:`smoothing_report`).

    Raises:
        ConfigError: not prepared, already calibrated, bad ``alpha``/``alphas``/``kinds``/
            ``method``/``max_rows``.
        DataError: no batch, or NaN/inf in a layer's input.
    """
    config = get_config(model)
    quantizers = [q for _, q in named_quantizers(model)]
    if config is None and not quantizers:
        raise ConfigError("smooth() needs a prepared model: call vitquant.quant.prepare() first")
    calibrated = [q.name for q in quantizers if q.is_calibrated]
    if calibrated:
        raise ConfigError(
            f"smooth() runs between prepare() and calibrate(): {len(calibrated)} quantizer(s) "
            f"are calibrated already (e.g. {calibrated[0]}); smooth a freshly prepared model"
        )
    config = config or QuantConfig()
    grid = _grid(alpha, alphas)
    method = method or config.effective_calibrator
    _check_method("method", method)
    _check_method("weight_method", weight_method)
    percentile = config.percentile if percentile is None else float(percentile)
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"percentile={percentile} must be in (0, 100]")
    if max_rows is not None and (isinstance(max_rows, bool) or int(max_rows) < 1):
        raise ConfigError(f"max_rows={max_rows} must be at least 1 (or None)")
    if act_error_ratio is not None and not 0.0 < float(act_error_ratio) <= 1.0:
        raise ConfigError(f"act_error_ratio={act_error_ratio} must be in (0, 1] (or None)")
    pairs = _targets(model, kinds)
    if not pairs:
        warnings.warn("smooth: no layer to smooth (no quantized LayerNorm/MLP input)", stacklevel=3)
        return []
    stats = _collect(model, pairs, data, num_batches, max_rows, seed, progress)
    layers: Iterable[ChannelPair] = pairs
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(pairs, desc="smooth", leave=False)
    done: list[SmoothLayer] = []
    for p in layers:
        rows, act_max = stats[p.name].sample(), stats[p.name].absmax
        if rows is None or act_max is None:
            continue  # the layer saw no data
        search = _LayerSearch(
            p, rows, act_max, (method, weight_method), percentile, int(config.num_bins)
        )
        base = search.error(None)
        # the search keeps the layer unsmoothed unless some alpha does better; a fixed one is used
        best: tuple[float, float | None, Tensor | None] = (math.inf, None, None)
        if alpha == "search":
            best = (base, None, None)
        for a in grid:
            s = smoothing_factors(search.act_max, search.weight_max, a)
            err = search.error(s)
            if err < best[0]:
                best = (err, a, s)
        err, chosen, s = best
        if p.kind == "act" and act_error_ratio is not None and err > act_error_ratio * base:
            err, chosen, s = base, None, None  # not worth the runtime's per-channel division
        if s is not None:
            apply_channel_scale(p, s)
        scale = s if s is not None else torch.ones_like(search.act_max)
        done.append(SmoothLayer(p.name, p.kind, p.producer_name, chosen, err, base, scale.cpu()))
    object.__setattr__(model, _REPORT_ATTR, [*smoothing_report(model), *done])
    return done


_PASS_OPTIONS = (
    "alpha", "kinds", "alphas", "method", "percentile", "weight_method", "max_rows", "seed",
    "progress", "act_error_ratio",
)  # fmt: skip


@CALIBRATION_PASSES.register("smooth")
class SmoothPass(CalibrationPass):
    """The calibration pass ``"smooth"``: :func:`smooth` before the statistics.

    Options (``QuantConfig.pass_options["smooth"]``): ``alpha`` (default ``"search"``),
    ``kinds``, ``alphas``, ``method``, ``percentile``, ``weight_method``, ``max_rows``, ``seed``,
    ``progress``, ``act_error_ratio``, as :func:`smooth` (so a model calibrated already is
    refused: smooth a freshly prepared one). The records are in :attr:`layers` and
    :func:`smoothing_report`.
    """

    name = "smooth"

    def __init__(self, **options: Any) -> None:
        bad = set(options) - set(_PASS_OPTIONS)
        if bad:
            raise ConfigError(
                f"smooth: unknown option(s) {', '.join(sorted(bad))}; use "
                f"{', '.join(sorted(_PASS_OPTIONS))}"
            )
        super().__init__(**options)
        _grid(options.get("alpha", "search"), options.get("alphas", ALPHA_GRID))
        self.layers: list[SmoothLayer] = []

    def before_statistics(
        self, model: nn.Module, batches: Sequence[Any], config: QuantConfig
    ) -> None:
        opts = {k: v for k, v in self.options.items() if k != "alpha"}
        self.layers = smooth(model, batches, self.options.get("alpha", "search"), **opts)


def smooth_and_calibrate(
    model: nn.Module,
    data: Iterable[Any],
    config: QuantConfig | None = None,
    alpha: float | str | None = None,
    *,
    smooth_options: dict[str, Any] | None = None,
    **calibrate_kwargs: Any,
) -> nn.Module:
    """PTQ with SmoothQuant: ``prepare`` (a float model), :func:`smooth`, then ``calibrate``.

    Args:
        model: a float model (prepared here with ``config``) or a prepared, uncalibrated one.
        data: calibration batches, read by both passes (an iterator is read once into a list).
        config: the :class:`QuantConfig` (default ``QuantConfig()``); for a prepared model,
            None or the config it was prepared with. When it names the calibration pass
            ``"smooth"``, that pass smooths (with its ``pass_options``) and ``alpha`` must be
            None.
        alpha: a number in ``[0, 1]`` or ``"search"`` (None: ``"search"``).
        smooth_options: other keyword arguments of :func:`smooth` (``kinds``, ``alphas``,
            ``max_rows``, ``seed``).
        **calibrate_kwargs: those of :func:`vitquant.quant.calibrate`; ``method``,
            ``percentile``, ``weight_method``, ``num_batches`` and ``progress`` drive the
            search too.

    Returns:
        ``model``, prepared, smoothed and calibrated (:func:`smoothing_report` says how).

    Raises:
        ConfigError: a prepared model with another config, a calibrated one, bad options.
        DataError: as :func:`smooth` and ``calibrate``.
    """
    own = get_config(model)
    if own is None:
        if any(isinstance(m, Quantizer) for m in model.modules()):
            raise ConfigError("the model has quantizers but no QuantConfig; pass a float model")
        prepare(model, config if config is not None else QuantConfig())
    elif config is not None and config.to_dict() != own.to_dict():
        raise ConfigError("the model was prepared with another QuantConfig than config=")
    cfg = get_config(model)
    assert cfg is not None
    if SmoothPass.name in cfg.effective_passes:
        if alpha is not None or smooth_options:
            raise ConfigError(
                "the config's 'smooth' calibration pass smooths already: set its options in "
                "pass_options['smooth'] instead of alpha/smooth_options"
            )
        return calibrate(model, data, **calibrate_kwargs)
    if calibrate_kwargs.get("device") is not None:
        model.to(calibrate_kwargs["device"])
    num_batches = calibrate_kwargs.get("num_batches")
    if iter(data) is data:  # an iterator: both passes need the same batches
        data = list(itertools.islice(data, num_batches))
    shared = ("method", "percentile", "weight_method", "num_batches", "progress")
    opts = {k: v for k, v in calibrate_kwargs.items() if k in shared and v is not None}
    smooth(model, data, "search" if alpha is None else alpha, **opts, **(smooth_options or {}))
    return calibrate(model, data, **calibrate_kwargs)

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

The statistics, the per-layer search and the factors (:func:`smoothing_factors`,
:data:`ALPHA_GRID`) live in :mod:`vitquant.methods.ptq.smooth_search` (re-exported here); the
folds themselves in :mod:`vitquant.quant.reparam`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.methods.ptq.smooth_search import (
    ALPHA_GRID,
    _check_method,
    _collect,
    _grid,
    _LayerSearch,
    _targets,
    smoothing_factors,
)
from vitquant.quant.api import calibrate, get_config, named_quantizers, prepare
from vitquant.quant.config import QuantConfig
from vitquant.quant.passes import CALIBRATION_PASSES, CalibrationPass
from vitquant.quant.quantizers import Quantizer
from vitquant.quant.reparam import PAIR_KINDS, ChannelPair, apply_channel_scale

__all__ = [
    "ALPHA_GRID",
    "SmoothLayer",
    "SmoothPass",
    "smooth",
    "smooth_and_calibrate",
    "smoothing_factors",
    "smoothing_report",
]

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


def smoothing_report(model: nn.Module) -> list[SmoothLayer]:
    """The :class:`SmoothLayer` records of every :func:`smooth` run on ``model`` ([] if none)."""
    return list(getattr(model, _REPORT_ATTR, []))


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
    shows_progress = True

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

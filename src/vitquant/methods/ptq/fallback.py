"""Accuracy-driven fallback (mixed precision): the fewest sensitive layers at higher precision.

:func:`fallback` takes a calibrated quantized model (:func:`vitquant.quant.prepare` +
:func:`~vitquant.quant.calibrate`), its float model and a validation subset, and raises layers,
most sensitive first, to ``higher_bits`` (8: weights and inputs of the layer at 8 bits when the
model's bits are lower) or to float (``higher_bits=None``, or a layer already at ``higher_bits``:
its quantizers are switched off), re-measuring the whole model after each layer and stopping as
soon as the budget holds, as OpenVINO NNCF's ``quantize_with_accuracy_control`` does:

* with labels, ``max_drop``: the top-1 drop against the float model, in points;
* without labels, ``target_agreement``: the percentage of images whose top-1 class is the float
  model's.

The ranking is :func:`vitquant.quant.analyze.analyze`'s per-layer sensitivity (only that layer
quantized, relative logit error). A layer raised to more bits gets only its own quantizers
re-calibrated, as :func:`~vitquant.quant.calibrate` calibrates them (activation statistics with
quantization off over the same calibration batches, weights by their maximum), so the result
equals preparing with :meth:`FallbackReport.quant_config` and calibrating; except for inputs that
``ln_reparam`` (repq) folded into a LayerNorm, which are re-calibrated per tensor on the folded
activation instead of being folded again. An optional final pass (``prune``) returns each kept
layer to low precision when the budget still holds. Greedy is not optimal in general; after the
prune pass no single kept layer can go back.

The model is changed in place; the :class:`FallbackReport` lists the layers, every measured step
and the bytes of the weights at their bits (``report.table()``, ``report.to_json(path)``).
Switched-off quantizers are not part of a state dict: to save a model with float layers, prepare
and calibrate it with ``report.quant_config()`` (those points then have no quantizer).

Its options and report (JSON, table) are in :mod:`vitquant.methods.ptq.fallback_report`.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError, DataError
from vitquant.methods.ptq.fallback_report import (
    _EPS,
    FallbackConfig,
    FallbackLayer,
    FallbackReport,
    FallbackStep,
)
from vitquant.methods.ptq.reconstruct_pass import reconstruct_report, without_reconstruction
from vitquant.quant import (
    QuantConfig,
    batch_input,
    get_config,
    named_quantizers,
    quantization_disabled,
)
from vitquant.quant.analyze import AnalysisReport, LayerReport, analyze
from vitquant.quant.modules.base import QuantModule
from vitquant.quant.quantizers import Quantizer
from vitquant.quant.quantizers.base import RANGE_TENSORS

__all__ = ["FallbackConfig", "FallbackStep", "FallbackLayer", "FallbackReport", "fallback"]


@dataclass
class _Layer:
    """A candidate layer: its active quantizers and their low / high precision states."""

    name: str
    module: nn.Module
    quantizers: list[tuple[str, Quantizer]]
    sensitivity: float
    low: list[dict[str, Any]]
    high: list[dict[str, Any]] | None = None


def _snapshot(q: Quantizer) -> dict[str, Any]:
    state = {n: getattr(q, n).detach().clone() for n in RANGE_TENSORS}
    return {"bits": q.bits, "enabled": q.enabled, **state}


def _restore(q: Quantizer, state: dict[str, Any]) -> None:
    q.bits, q.enabled = state["bits"], state["enabled"]
    for n in RANGE_TENSORS:
        cur = getattr(q, n)
        if isinstance(cur, nn.Parameter):
            cur.data = state[n].clone()
        else:
            setattr(q, n, state[n].clone())


def _weight_of(layer: _Layer, qname: str, q: Quantizer) -> Tensor | None:
    """The parameter a weight quantizer of ``layer`` quantizes (None for activations)."""
    slot = qname.rpartition(".")[2]
    pname = getattr(layer.module, "quant_weights", {}).get(slot)
    if pname is None:
        if q.role == "weight":
            raise ConfigError(f"{qname}: cannot find the weight it quantizes to re-calibrate it")
        return None
    return getattr(layer.module, pname)


def _set_high(model: nn.Module, layer: _Layer, cfg: FallbackConfig, env: dict[str, Any]) -> None:
    """Raises ``layer`` (re-calibrating its quantizers at ``higher_bits``) or switches it off."""
    if layer.high is not None:
        for (_, q), s in zip(layer.quantizers, layer.high):
            _restore(q, s)
        return
    hb = cfg.higher_bits
    if _goes_float(layer, hb):
        for _, q in layer.quantizers:
            q.enabled = False
    else:
        assert hb is not None
        raised = [(n, q) for n, q in layer.quantizers if q.bits < hb]
        acts = [(n, q) for n, q in raised if _weight_of(layer, n, q) is None]
        for _, q in raised:
            q.bits = hb
        if acts:
            _recalibrate_acts(model, acts, env)
        for n, q in raised:
            w = _weight_of(layer, n, q)
            if w is not None:
                q.calibrate_tensor(w.detach(), "max")  # calibrate()'s weight_method
    layer.high = [_snapshot(q) for _, q in layer.quantizers]


def _set_low(layer: _Layer) -> None:
    for (_, q), s in zip(layer.quantizers, layer.low):
        _restore(q, s)


def _goes_float(layer: _Layer, higher_bits: int | None) -> bool:
    return higher_bits is None or all(q.bits >= higher_bits for _, q in layer.quantizers)


def _recalibrate_acts(
    model: nn.Module, acts: list[tuple[str, Quantizer]], env: dict[str, Any]
) -> None:
    """:func:`calibrate`'s activation pass for ``acts`` only: statistics with quantization off
    over the calibration batches, then ranges with the model's calibrator."""
    method = env["method"]
    try:
        with quantization_disabled(model), torch.no_grad():
            for _, q in acts:
                q.start_calibration(method, num_bins=env["num_bins"])
            for x in env["calib"]:
                model(x)
        for n, q in acts:
            if not q.has_statistics:
                raise DataError(f"{n} saw no data in the calibration batches")
            q.finish_calibration(method, percentile=env["percentile"])
    finally:
        for _, q in acts:
            q.calibrating = False


def _weight_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of every quantizable weight at its quantizer's bits (float where it has none or it
    is off), and the same weights in float."""
    total = flt = 0
    for _, m in model.named_modules():
        if not isinstance(m, QuantModule):
            continue
        for slot, pname in m.quant_weights.items():
            w = getattr(m, pname, None)
            if not isinstance(w, Tensor):
                continue
            fbits = w.element_size() * 8
            q = getattr(m, slot, None)
            on = isinstance(q, Quantizer) and q.enabled and q.is_calibrated
            bits = q.bits if on else fbits  # type: ignore[union-attr]
            total += (w.numel() * bits + 7) // 8
            flt += w.numel() * fbits // 8
    return total, flt


def _layer_record(layer: _Layer) -> FallbackLayer:
    bits: dict[str, list[int | None]] = {}
    cost = 0
    assert layer.high is not None
    for (n, q), lo, hi in zip(layer.quantizers, layer.low, layer.high):
        high = hi["bits"] if hi["enabled"] else None
        bits[n] = [int(lo["bits"]), high]
        w = _weight_of(layer, n, q)
        if w is not None:
            hb = w.element_size() * 8 if high is None else high
            cost += (w.numel() * hb + 7) // 8 - (w.numel() * int(lo["bits"]) + 7) // 8
    return FallbackLayer(layer.name, bits, layer.sensitivity, cost)


# --- inputs ----------------------------------------------------------------------------------
def _make_config(
    config: FallbackConfig | dict[str, Any] | None, options: dict[str, Any]
) -> FallbackConfig:
    """``config`` with ``options`` set (a budget in ``options`` replaces the config's)."""
    if config is not None and not isinstance(config, (FallbackConfig, dict)):
        raise ConfigError(f"config must be a FallbackConfig or a dict, not {type(config).__name__}")
    base = config.to_dict() if isinstance(config, FallbackConfig) else dict(config or {})
    for a, b in (("max_drop", "target_agreement"), ("target_agreement", "max_drop")):
        if options.get(a) is not None:
            base.pop(b, None)
    return FallbackConfig.from_dict({**base, **options})


def _take(
    batches: Iterable[Any], dev: torch.device, what: str
) -> tuple[list[Tensor], list[Tensor | None]]:
    """The inputs (on ``dev``) and the labels of ``(input, label)`` batches (None otherwise)."""
    inputs: list[Tensor] = []
    labels: list[Tensor | None] = []
    for b in batches:
        inputs.append(batch_input(b).to(dev))
        y = b[1] if isinstance(b, (tuple, list)) and len(b) > 1 else None
        labels.append(y if isinstance(y, Tensor) else None)
    if not inputs:
        raise DataError(f"the {what} batches are empty")
    return inputs, labels


def _labels(
    given: Tensor | Sequence[Tensor] | None, from_batches: list[Tensor | None], n: int
) -> Tensor | None:
    if given is None:
        if any(y is None for y in from_batches):
            return None
        given = list(from_batches)  # type: ignore[arg-type]
    y = given if isinstance(given, Tensor) else torch.cat([torch.as_tensor(t) for t in given])
    y = y.reshape(-1)
    if y.numel() != n or y.is_floating_point():
        raise DataError(f"labels: expected {n} integer class labels, got {y.numel()} ({y.dtype})")
    return y.long().cpu()


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    y = model(x)
    return (y[0] if isinstance(y, (tuple, list)) else y).float()


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _candidates(
    model: nn.Module, ranking: AnalysisReport, cfg: FallbackConfig
) -> tuple[list[_Layer], list[LayerReport]]:
    quantizers = dict(named_quantizers(model))
    layers: list[_Layer] = []
    ranked: list[LayerReport] = []
    for rep in ranking.by_sensitivity():
        if not any(fnmatch.fnmatchcase(rep.name, p) for p in cfg.candidates):
            continue
        missing = [n for n in rep.quantizers if n not in quantizers]
        if missing:
            raise ConfigError(
                f"the sensitivity ranking does not match the quantized model: no {missing[0]} "
                "(model_float must be the model model_quantized was prepared from)"
            )
        qs = [(n, quantizers[n]) for n in rep.quantizers]
        qs = [(n, q) for n, q in qs if q.enabled and q.is_calibrated]
        if not qs:
            continue
        module = model.get_submodule(rep.name)
        layers.append(_Layer(rep.name, module, qs, rep.rel_error, [_snapshot(q) for _, q in qs]))
        ranked.append(rep)
    if not layers:
        raise ConfigError(
            f"no quantized layer matches candidates={cfg.candidates}; layers: "
            f"{', '.join(x.name for x in ranking.layers)}"
        )
    return layers, ranked


def _check_models(model_float: nn.Module, model_quantized: nn.Module) -> QuantConfig:
    if model_float is model_quantized:
        raise ConfigError(
            "model_float is model_quantized: prepare() works in place, so pass the float model "
            "copied before it (prepare(copy.deepcopy(model), config))"
        )
    if get_config(model_float) is not None or any(True for _ in named_quantizers(model_float)):
        raise ConfigError("model_float must be the float model, not a prepared one")
    qcfg = get_config(model_quantized)
    quantizers = [q for _, q in named_quantizers(model_quantized)]
    if qcfg is None or not quantizers:
        raise ConfigError(
            "model_quantized is not prepared for quantization: prepare() and calibrate() it first"
        )
    if not any(q.is_calibrated for q in quantizers):
        raise ConfigError("model_quantized is not calibrated: calibrate() it first")
    return qcfg


# --- the entry point -------------------------------------------------------------------------
def fallback(
    model_float: nn.Module,
    model_quantized: nn.Module,
    batches: Iterable[Any],
    labels: Tensor | Sequence[Tensor] | None = None,
    config: FallbackConfig | dict[str, Any] | None = None,
    *,
    calib_batches: Iterable[Any] | None = None,
    sensitivity: AnalysisReport | None = None,
    progress: bool = True,
    **options: Any,
) -> FallbackReport:
    """Keeps the fewest, most sensitive layers at higher precision until the budget holds.

    ``model_quantized`` is changed in place (see the module docstring); ``model_float`` is not.

    Args:
        model_float: the float model ``model_quantized`` was prepared from (a copy made before
            :func:`~vitquant.quant.prepare`).
        model_quantized: the prepared and calibrated model.
        batches: the validation subset: tensors or ``(input, label)`` pairs (held in memory).
        labels: class labels of ``batches`` (one tensor, or one per batch); default: the labels
            of ``(input, label)`` batches. Needed for ``max_drop``; with ``target_agreement``
            they only add top-1 to the report.
        config: a :class:`FallbackConfig` (or its dict); ``options`` override its fields
            (``max_drop=0.5``, ``target_agreement=99.5``, ``higher_bits=None``, ...).
        calib_batches: the batches ``model_quantized`` was calibrated on: raised layers are
            re-calibrated on them, and :func:`analyze` ranks the layers on them (default, and
            for float fallback only: the validation batches rank).
        sensitivity: an :class:`AnalysisReport` of ``model_float`` with the model's config, to
            reuse instead of running :func:`analyze`.
        progress: progress bars.

    Returns:
        The :class:`FallbackReport` (``met`` False, with a warning, when raising every candidate
        up to ``max_layers`` does not reach the budget; the model then keeps them raised).

    Raises:
        ConfigError: invalid budget or options, an unprepared or uncalibrated
            ``model_quantized``, a ``model_float`` that is prepared or computes another function,
            or layers raised to more bits without ``calib_batches``.
        DataError: empty batches, or ``max_drop`` without labels.
    """
    cfg = _make_config(config, options)
    qcfg = _check_models(model_float, model_quantized)
    if reconstruct_report(model_quantized) is not None:
        warnings.warn(
            "fallback: the model was block-reconstructed, which moved its weights onto their "
            "low-bit grid; raised layers keep those weights. Run fallback before reconstruction "
            "(calibrate without the reconstruct pass, fallback, then reconstruct)",
            stacklevel=2,
        )
    rank_cfg = without_reconstruction(qcfg)  # the ranking calibrates a copy: no slow pass in it
    dev = _device(model_quantized)
    inputs, batch_labels = _take(batches, dev, "validation")
    n = sum(int(x.shape[0]) for x in inputs)
    y = _labels(labels, batch_labels, n)
    if cfg.metric == "drop" and y is None:
        raise DataError(
            "max_drop needs labels: pass labels= or (input, label) batches, or use "
            "target_agreement= (agreement with the float model) instead"
        )
    calib = None if calib_batches is None else _take(calib_batches, dev, "calibration")[0]
    if sensitivity is not None and not isinstance(sensitivity, AnalysisReport):
        raise ConfigError(f"sensitivity must be an AnalysisReport, not {type(sensitivity)}")
    method = cfg.method or qcfg.effective_calibrator
    percentile = qcfg.percentile if cfg.percentile is None else float(cfg.percentile)
    env = {"calib": calib, "method": method, "percentile": percentile, "num_bins": qcfg.num_bins}
    modes = (model_float.training, model_quantized.training)
    model_float.eval()
    model_quantized.eval()
    try:
        ref = _reference(model_float, model_quantized, inputs)
        if sensitivity is None:
            sensitivity = analyze(
                model_float, calib or inputs, rank_cfg, method=method, percentile=percentile,
                progress=progress,
            )  # fmt: skip
        layers, ranked = _candidates(model_quantized, sensitivity, cfg)
        if calib is None and any(not _goes_float(x, cfg.higher_bits) for x in layers):
            raise ConfigError(
                f"raising layers to {cfg.higher_bits} bits re-calibrates them: pass "
                "calib_batches= (the batches the model was calibrated on), or higher_bits=None "
                "for float fallback"
            )
        ref_top1 = torch.cat([r.argmax(-1) for r in ref]).cpu()
        float_top1 = None if y is None else 100.0 * float((ref_top1 == y).float().mean())
        kept, steps = _search(model_quantized, layers, cfg, env, inputs, ref, y, float_top1)
    finally:
        model_float.train(modes[0])
        model_quantized.train(modes[1])
    met = [s for s in steps if s.accepted][-1].meets
    if not met:
        warnings.warn(
            f"fallback: the budget is not met even with {len(kept)} layer(s) at higher "
            "precision (see report.steps"
            + (")" if cfg.higher_bits is None else "; higher_bits=None falls back to float)"),
            stacklevel=2,
        )
    return FallbackReport(
        config=cfg.to_dict(),
        qconfig=qcfg.to_dict(),
        images=n,
        float_top1=float_top1,
        met=met,
        layers=[_layer_record(x) for x in kept],
        steps=steps,
        ranking=ranked,
        float_weight_bytes=_weight_bytes(model_quantized)[1],
    )


def _reference(model_float: nn.Module, model: nn.Module, inputs: list[Tensor]) -> list[Tensor]:
    """The float logits; ConfigError unless ``model`` with quantization off computes them."""
    fdev = _device(model_float)
    with torch.no_grad():
        ref = [_logits(model_float, x.to(fdev)).to(x.device) for x in inputs]
        with quantization_disabled(model):
            off = [_logits(model, x) for x in inputs]
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(ref, off))
    den = max(sum(float(a.pow(2).sum()) for a in ref), 1e-30)
    if num > 1e-6 * den:
        raise ConfigError(
            f"model_quantized with quantization off differs from model_float (rel. logit error "
            f"{(num / den) ** 0.5:.3g}): pass the float model it was prepared from"
        )
    return ref


def _search(
    model: nn.Module,
    layers: list[_Layer],
    cfg: FallbackConfig,
    env: dict[str, Any],
    inputs: list[Tensor],
    ref: list[Tensor],
    labels: Tensor | None,
    float_top1: float | None,
) -> tuple[list[_Layer], list[FallbackStep]]:
    """The greedy loop and the prune pass; returns the kept layers and every step."""
    kept: list[_Layer] = []
    ref_top1 = torch.cat([r.argmax(-1) for r in ref]).cpu()

    def measure(action: str, layer: str, accepted: bool = True) -> FallbackStep:
        with torch.no_grad():
            out = [_logits(model, x) for x in inputs]
        err = sum(float((o - r).pow(2).sum()) for o, r in zip(out, ref))
        norm = sum(float(r.pow(2).sum()) for r in ref)
        top1 = torch.cat([o.argmax(-1) for o in out]).cpu()
        agreement = 100.0 * float((top1 == ref_top1).float().mean())
        acc = drop = None
        if labels is not None and float_top1 is not None:
            acc = 100.0 * float((top1 == labels).float().mean())
            drop = float_top1 - acc
        if cfg.metric == "drop":
            assert drop is not None and cfg.max_drop is not None
            meets = drop <= cfg.max_drop + _EPS
        else:
            assert cfg.target_agreement is not None
            meets = agreement >= cfg.target_agreement - _EPS
        return FallbackStep(
            action, layer, accepted, meets, agreement, (err / max(norm, 1e-30)) ** 0.5,
            acc, drop, _weight_bytes(model)[0], len(kept),
        )  # fmt: skip

    steps = [measure("baseline", "")]
    for layer in layers:
        if steps[-1].meets or (cfg.max_layers is not None and len(kept) >= cfg.max_layers):
            break
        _set_high(model, layer, cfg, env)
        kept.append(layer)
        steps.append(measure("raise", layer.name))
    if cfg.prune and steps[-1].meets and len(kept) > 1:
        # without the last raised layer the model is the previous step's, which missed
        for layer in reversed(kept[:-1]):
            _set_low(layer)
            kept.remove(layer)
            step = measure("lower", layer.name)
            if not step.meets:
                _set_high(model, layer, cfg, env)
                kept.insert(0, layer)
                step.accepted = False
                step.layers = len(kept)
            steps.append(step)
        kept.sort(key=layers.index)
    return kept, steps

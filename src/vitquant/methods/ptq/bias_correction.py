"""Bias correction: remove the mean error that quantization adds to each layer's output.

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV
2019, section 4.2 (empirical bias correction); OpenVINO NNCF runs the same idea (its "fast bias
correction") in its default int8 recipe. Quantizing a Linear's weight and input shifts the mean
of its output: ``E[Q(X) Q(W)ᵀ] ≠ E[X Wᵀ]``, most where a clipped activation range cuts one tail
of an asymmetric distribution (post-GELU inputs of ``fc2``) or at 4 bits, where the rounding
error of a weight row no longer averages out. The shift is a constant per output channel, so the
bias absorbs it exactly:

    b ← b + E[X Wᵀ − Q(X) Q(W)ᵀ]          (mean over calibration images and tokens)

``X`` is the input the layer receives in the quantized model, so the correction answers for the
layer's own error given the activations it really sees; the errors of earlier layers are
corrected in those layers. Layers are corrected in the order the model runs them (``sequential``,
the default): each layer's mean is taken after the layers before it were corrected, one
forward pass per layer of the calibration batches, but only up to that layer (the pass stops
there). ``sequential=False`` corrects every layer from one pass (cheaper, slightly less exact).

The correction changes only ``bias`` tensors, so a corrected model exports and lowers like any
calibrated model; layers without a bias are left alone (adding one would change the model's
state-dict keys). Registered as the calibration pass ``"bias_correct"``
(:mod:`vitquant.quant.passes`), which runs after the ranges are set and after every other
range or weight refinement (``output_mse``, ``reconstruct``); or :func:`correct_bias` on a
calibrated model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError, DataError
from vitquant.quant.api import batch_input
from vitquant.quant.modules import QuantLinear
from vitquant.quant.passes import CALIBRATION_PASSES, CalibrationPass

__all__ = ["BiasCorrection", "BiasShift", "correct_bias"]


@dataclass
class BiasShift:
    """The correction added to one layer's bias: its size and the output scale it compares to."""

    name: str
    mean_abs_shift: float
    max_abs_shift: float
    output_rms: float


class _Stop(Exception):
    """Raised by the hook of the layer being corrected: the rest of the forward is not needed."""


def _quantized(m: QuantLinear) -> bool:
    return any(
        q is not None and q.active
        for q in (m.input_quantizer, m.weight_quantizer, m.output_quantizer)
    )


def _layer_error(m: QuantLinear, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum over rows of (float − quantized) output, sum of squared float output)``."""
    with torch.no_grad():
        yq = m.forward(x)  # not m(x): this runs inside m's own pre-hook
        quantizers = [q for q in (m.input_quantizer, m.weight_quantizer, m.output_quantizer) if q]
        saved = [q.enabled for q in quantizers]
        for q in quantizers:
            q.enabled = False
        try:
            yf = m.forward(x)
        finally:
            for q, was in zip(quantizers, saved, strict=True):
                q.enabled = was
    diff = (yf - yq).reshape(-1, yf.shape[-1]).double()
    return diff.sum(0), yf.double().pow(2).sum()


class _Collector:
    """Forward hooks summing each watched layer's output error (and stopping after ``last``)."""

    def __init__(self, layers: dict[str, QuantLinear], last: str | None) -> None:
        self.sums: dict[str, Tensor] = {}
        self.squares: dict[str, float] = {}
        self.rows: dict[str, int] = {}
        self.handles = [
            m.register_forward_pre_hook(self._hook(name, name == last))
            for name, m in layers.items()
        ]
        self.layers = layers

    def _hook(self, name: str, stop: bool) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if not torch.is_tensor(x):
                return
            d, sq = _layer_error(self.layers[name], x)
            self.sums[name] = self.sums.get(name, 0) + d
            self.squares[name] = self.squares.get(name, 0.0) + float(sq)
            self.rows[name] = self.rows.get(name, 0) + x.numel() // x.shape[-1]
            if stop:
                raise _Stop

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _run(model: nn.Module, inputs: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for x in inputs:
            try:
                model(x)
            except _Stop:
                pass


def _apply(name: str, m: QuantLinear, col: _Collector) -> BiasShift:
    if name not in col.rows:
        raise DataError(f"bias_correct: layer {name!r} was not reached by the calibration data")
    shift = (col.sums[name] / col.rows[name]).to(m.bias.dtype)  # type: ignore[union-attr]
    if not bool(torch.isfinite(shift).all()):
        raise DataError(f"bias_correct: non-finite output error in layer {name!r}")
    with torch.no_grad():
        m.bias.add_(shift.to(m.bias.device))  # type: ignore[union-attr]
    rms = (col.squares[name] / (col.rows[name] * shift.numel())) ** 0.5
    a = shift.abs()
    return BiasShift(name, float(a.mean()), float(a.max()), rms)


def correct_bias(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    num_batches: int | None = None,
    sequential: bool = True,
    layers: Sequence[str] | None = None,
) -> list[BiasShift]:
    """Adds to each quantized Linear's bias the mean error quantization adds to its output.

    Args:
        model: a prepared and calibrated model (quantization on).
        batches: calibration batches (tensors, ``(input, label)`` pairs or dicts).
        num_batches: how many of them to use (None: all).
        sequential: correct layer by layer in execution order (each mean taken after the
            earlier layers' corrections; one partial forward per layer), else all from one pass.
        layers: names of the layers to correct (None: every quantized ``QuantLinear`` with a
            bias).

    Returns:
        One :class:`BiasShift` per corrected layer, in execution order.

    Raises:
        ConfigError: ``layers`` names a module that is not a quantized, biased ``QuantLinear``.
        DataError: no batches, a layer the data never reaches, a non-finite error.
    """
    inputs = [batch_input(b) for b in list(batches)[:num_batches]]
    if not inputs:
        raise DataError("bias_correct needs at least one calibration batch")
    found = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.bias is not None and _quantized(m)
    }
    if layers is not None:
        bad = [n for n in layers if n not in found]
        if bad:
            raise ConfigError(f"bias_correct: not a quantized Linear with a bias: {', '.join(bad)}")
        found = {n: found[n] for n in layers}
    if not found:
        return []
    was_training = model.training
    model.eval()
    try:
        order = _execution_order(model, found, inputs[0])
        if not sequential:
            col = _Collector(found, None)
            try:
                _run(model, inputs)
            finally:
                col.close()
            return [_apply(n, found[n], col) for n in order]
        out = []
        for name in order:
            col = _Collector({name: found[name]}, name)
            try:
                _run(model, inputs)
            finally:
                col.close()
            out.append(_apply(name, found[name], col))
        return out
    finally:
        model.train(was_training)


def _execution_order(model: nn.Module, layers: dict[str, QuantLinear], x: Tensor) -> list[str]:
    """The layers' names in the order a forward pass on ``x[:1]`` reaches them."""
    seen: list[str] = []

    def hook(name: str) -> Any:
        return lambda _m, _a: None if name in seen else seen.append(name)

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return seen + [n for n in layers if n not in seen]


@CALIBRATION_PASSES.register("bias_correct")
class BiasCorrection(CalibrationPass):
    """The calibration pass of :func:`correct_bias` (its keyword arguments are the options).

    Runs last (after ``output_mse`` and ``reconstruct``, which change ranges and weights); the
    shifts are in :attr:`shifts`.
    """

    name = "bias_correct"
    runs_last = True
    option_names = frozenset({"num_batches", "sequential", "layers"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.shifts: list[BiasShift] = []

    def after_ranges(self, model: nn.Module, batches: Sequence[Any], config: Any) -> None:
        self.shifts = correct_bias(model, batches, **self.options)

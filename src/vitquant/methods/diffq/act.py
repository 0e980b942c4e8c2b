"""Activation quantization added at evaluation time, as DiffQ's fairseq ``eval.sh`` does.

DiffQ (Défossez et al., 2021, arXiv 2104.09987) quantizes weights only; its fairseq example
evaluates a trained model with ``--act --act-samples 50 --act-method {minmax,minmax_pc,histogram}
--act-fake``: observers record the inputs of the linear layers on a few batches, then those inputs
are fake-quantized to 8-bit asymmetric integers. :func:`quantize_activations` does the same with
vitquant's observers (:mod:`vitquant.quant.calibrators`) and primitives:

* ``minmax``: running min/max of each layer input, per tensor;
* ``minmax_pc``: per channel (the last, feature, dimension);
* ``histogram``: a histogram per tensor read with the MSE-optimal range (torch.ao's
  ``HistogramObserver`` objective).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError, DataError
from vitquant.quant.observers import HistogramObserver, MinMaxObserver
from vitquant.quant.primitives import check_bits, expand_to, fake_quant, qparams_from_minmax, qrange

__all__ = ["ACT_METHODS", "ActivationQuantization", "quantize_activations"]

ACT_METHODS = ("minmax", "minmax_pc", "histogram")


class ActivationQuantization:
    """Fake-quantizes the inputs of the selected layers; :meth:`remove` undoes it.

    Attributes:
        qparams: ``{layer name: (scale, zero_point)}`` once calibrated.
    """

    def __init__(self, model: nn.Module, method: str, bits: int, types: tuple[type, ...]) -> None:
        if method not in ACT_METHODS:
            raise ConfigError(f"--act {method!r}: use one of {', '.join(ACT_METHODS)}")
        self.method, self.bits = method, check_bits(bits, 2, 16, "act bits")
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, types)}
        if not self.layers:
            raise ConfigError("the model has no layer whose inputs can be quantized")
        self.observers: dict[str, Any] = {}
        self.qparams: dict[str, tuple[Tensor, Tensor]] = {}
        self._handles: list[Any] = []
        for name, layer in self.layers.items():
            if method == "histogram":
                self.observers[name] = HistogramObserver()
            else:
                self.observers[name] = MinMaxObserver(axis=-1 if method == "minmax_pc" else None)
            self._handles.append(layer.register_forward_pre_hook(self._observe_hook(name)))

    def _observe_hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, inputs: tuple) -> None:
            self.observers[name].collect(inputs[0])

        return hook

    def _quant_hook(self, name: str) -> Callable[[nn.Module, tuple], tuple]:
        scale, zp = self.qparams[name]
        qmin, qmax = qrange(self.bits, signed=False)
        axis = -1 if self.method == "minmax_pc" else None

        def hook(module: nn.Module, inputs: tuple) -> tuple:
            x = inputs[0]
            s, z = expand_to(scale.to(x.device), x, axis), expand_to(zp.to(x.device), x, axis)
            return (fake_quant(x.float(), s, z, qmin, qmax).to(x.dtype), *inputs[1:])

        return hook

    def freeze(self) -> None:
        """Turns the observed ranges into quantization parameters and starts quantizing."""
        self.remove()
        for name, obs in self.observers.items():
            if obs.count == 0:
                raise DataError(f"layer {name} saw no data during activation calibration")
            lo, hi = obs.minmax()
            self.qparams[name] = qparams_from_minmax(lo, hi, self.bits)
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._quant_hook(name)))

    def remove(self) -> None:
        """Removes the hooks (the model computes in float again)."""
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def quantize_activations(
    model: nn.Module,
    batches: Iterable[Any],
    method: str = "minmax",
    bits: int = 8,
    samples: int = 50,
    types: tuple[type, ...] = (nn.Linear,),
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> ActivationQuantization:
    """Calibrates and enables fake quantization of the inputs of every ``types`` layer.

    Args:
        model: the model (put in ``eval()`` here, so a DiffQ quantizer uses its true weights).
        batches: calibration batches (``(inputs, targets)`` pairs or input tensors).
        method: ``"minmax"``, ``"minmax_pc"`` or ``"histogram"``.
        bits: activation bits (unsigned asymmetric grid).
        samples: number of batches to observe (the seed's ``--act-samples 50``).
        types: layer classes whose inputs are quantized.
        forward: ``forward(model, batch)``; default calls ``model(batch[0])`` for pairs.

    Returns:
        The :class:`ActivationQuantization`; call ``.remove()`` to go back to float activations.

    Raises:
        ConfigError: unknown method or bits; DataError: no batch.
    """
    act = ActivationQuantization(model, method, bits, types)
    model.eval()
    seen = 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for batch in batches:
        if seen >= samples:
            break
        if forward is not None:
            forward(model, batch)
        else:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            model(x.to(device))
        seen += 1
    if seen == 0:
        act.remove()
        raise DataError("no batch to calibrate the activations on")
    act.freeze()
    return act

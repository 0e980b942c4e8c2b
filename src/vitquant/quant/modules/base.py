"""Common machinery of the quantized modules: named quantizer slots.

Every quantized module keeps the float module's parameters (same names, same objects) and adds
quantizer slots, attributes ending in ``_quantizer``. A slot holds a
:class:`~vitquant.quant.quantizers.Quantizer` when the config quantizes that point and ``None``
when the point stays float (vitquant's convention: points a config does not enable are *absent*;
``enabled=False`` is only a temporary switch, see ``quantization_disabled``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, TypeVar

from torch import Tensor, nn

from vitquant.quant.quantizers import Quantizer

__all__ = ["QuantModule", "apply_q"]

_Q = TypeVar("_Q", bound="QuantModule")


def apply_q(q: Quantizer | None, x: Tensor) -> Tensor:
    """``q(x)``, or ``x`` when the slot is empty."""
    return x if q is None else q(x)


class QuantModule:
    """Mixin of quantized modules; ``quant_points`` maps slot names to point kinds."""

    quant_points: ClassVar[dict[str, str]] = {}
    #: Slot name -> name of the parameter that slot quantizes (weight quantizers only).
    quant_weights: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_float(cls: type[_Q], m: nn.Module) -> _Q:
        """Turns the float module ``m`` into a ``cls`` in place and returns it.

        For the classes that subclass the float module they replace (``QuantLinear`` for
        ``nn.Linear``, ...): the instance's class changes, its parameters, buffers and hooks stay
        (so the state dict is unchanged), and the quantizer slots are created empty.
        """
        m.__class__ = cls
        assert isinstance(m, cls)
        m.init_slots()
        return m

    def point_kinds(self) -> dict[str, str]:
        """Slot name -> point kind (see ``vitquant.quant.presets.POINT_KINDS``)."""
        return dict(self.quant_points)

    def init_slots(self) -> None:
        """Creates the empty slots (``None``) that are not there yet."""
        assert isinstance(self, nn.Module)
        for attr in self.point_kinds():
            if attr not in self._modules:
                self.register_module(attr, None)

    def quantizers(self) -> Iterator[tuple[str, Quantizer]]:
        """The filled slots as ``(slot name, quantizer)``."""
        assert isinstance(self, nn.Module)
        for attr in self.point_kinds():
            q = self._modules.get(attr)
            if isinstance(q, Quantizer):
                yield attr, q

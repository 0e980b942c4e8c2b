"""Quantizers: the :class:`~.base.Quantizer` interface and the calibrated uniform quantizer.

* :mod:`.base`: :class:`Quantizer`, the ``QUANTIZERS`` registry;
* :mod:`.shapes`: :class:`QParams` and the granularity helpers (re-exported by ``.base``);
* :mod:`.uniform`: calibrated fixed ranges (pytorch-quantization / TensorRT);
* :mod:`.dynamic`: per-token scales computed from each input (LLM.int8 / ZeroQuant).

Every other quantizer lives in its method's package and registers itself in ``QUANTIZERS`` with
``@QUANTIZERS.register(name)`` where it is defined; ``import vitquant`` imports every method
package, so all built-in names exist for ``QuantConfig`` and ``prepare``:

==============================  ================================================================
name                            class
==============================  ================================================================
``uniform``                     :class:`UniformQuantizer` (here)
``dynamic``                     :class:`DynamicQuantizer` (here)
``log2``, ``log2_sqrt2``        ``Log2Quantizer``, ``Log2Sqrt2Quantizer`` (``methods/repq``)
``lsq``, ``lsq+``               ``LSQQuantizer``, ``LSQPlusQuantizer`` (``methods/lsq``)
``qvit``                        ``QViTQuantizer`` (``methods/qvit``)
``vvtq``                        ``VVTQQuantizer`` (``methods/vvtq``)
==============================  ================================================================

(``tests/quant/test_quantizers.py`` checks this table against the registry, in a fresh
interpreter after ``import vitquant``.) The old names of the moved classes are forwarded from here
until vitquant 0.3.
"""

from __future__ import annotations

from vitquant._deprecated import forward
from vitquant.quant.quantizers.base import (
    QUANTIZERS,
    QParams,
    Quantizer,
    gran_from_dict,
    gran_str,
    gran_to_dict,
    quantizer_name,
)
from vitquant.quant.quantizers.dynamic import DynamicQuantizer
from vitquant.quant.quantizers.uniform import UniformQuantizer

__all__ = [
    "QUANTIZERS",
    "QParams",
    "Quantizer",
    "UniformQuantizer",
    "DynamicQuantizer",
    "gran_from_dict",
    "gran_to_dict",
    "gran_str",
    "quantizer_name",
    "build_quantizer",
]


def build_quantizer(name: str, **kwargs: object) -> Quantizer:
    """Instantiates the quantizer registered as ``name`` (unknown names raise ``ConfigError``)."""
    return QUANTIZERS.get(name)(**kwargs)  # type: ignore[arg-type]


__getattr__ = forward(
    __name__,
    {
        "Log2Quantizer": "vitquant.methods.repq.log2",
        "Log2Sqrt2Quantizer": "vitquant.methods.repq.log2",
        "LSQQuantizer": "vitquant.methods.lsq.quantizer",
        "LSQPlusQuantizer": "vitquant.methods.lsq.quantizer",
        "QViTQuantizer": "vitquant.methods.qvit.quantizer",
        "VVTQQuantizer": "vitquant.methods.vvtq.quantizer",
    },
)

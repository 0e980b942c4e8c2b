"""Quantizers: one method per file, all on the :class:`~.base.Quantizer` interface.

* :mod:`.base`: :class:`QParams`, :class:`Quantizer`, the ``QUANTIZERS`` registry;
* :mod:`.uniform`: calibrated fixed ranges (pytorch-quantization / TensorRT);
* :mod:`.log2`: FQ-ViT's log2 and RepQ-ViT's log-sqrt2 quantizers for softmax outputs;
* :mod:`.lsq`, :mod:`.qvit`, :mod:`.vvtq`: learned step sizes for QAT (LSQ / LSQ+, Q-ViT, VVTQ).

Registration: each class registers itself in ``QUANTIZERS`` with ``@QUANTIZERS.register(name)``
where it is defined, so a method file's names exist once that file is imported. This package
imports every method file below, hence importing it (or ``vitquant``, or ``vitquant.quant``)
registers all the built-in names that ``QuantConfig`` and ``prepare`` accept:

==============================  ================================================
name                            class
==============================  ================================================
``uniform``                     :class:`UniformQuantizer`
``log2``, ``log2_sqrt2``        :class:`Log2Quantizer`, :class:`Log2Sqrt2Quantizer`
``lsq``, ``lsq+``               :class:`LSQQuantizer`, :class:`LSQPlusQuantizer`
``qvit``                        :class:`QViTQuantizer`
``vvtq``                        :class:`VVTQQuantizer`
==============================  ================================================

A new method file must be imported here too (``tests/quant/test_quantizers.py`` checks this
table against the registry, in a fresh interpreter after ``import vitquant``). To keep these
imports free of cycles, method files import only ``vitquant.quant`` modules at module level;
anything from ``vitquant.qat`` or ``vitquant.train`` is imported inside the methods that use it
(as VVTQ does).
"""

from __future__ import annotations

from vitquant.quant.quantizers.base import (
    QUANTIZERS,
    QParams,
    Quantizer,
    gran_from_dict,
    gran_str,
    gran_to_dict,
    quantizer_name,
)
from vitquant.quant.quantizers.log2 import Log2Quantizer, Log2Sqrt2Quantizer
from vitquant.quant.quantizers.lsq import LSQPlusQuantizer, LSQQuantizer
from vitquant.quant.quantizers.qvit import QViTQuantizer
from vitquant.quant.quantizers.uniform import UniformQuantizer
from vitquant.quant.quantizers.vvtq import VVTQQuantizer

__all__ = [
    "QUANTIZERS",
    "QParams",
    "Quantizer",
    "UniformQuantizer",
    "Log2Quantizer",
    "Log2Sqrt2Quantizer",
    "LSQQuantizer",
    "LSQPlusQuantizer",
    "QViTQuantizer",
    "VVTQQuantizer",
    "gran_from_dict",
    "gran_to_dict",
    "gran_str",
    "quantizer_name",
    "build_quantizer",
]


def build_quantizer(name: str, **kwargs: object) -> Quantizer:
    """Instantiates the quantizer registered as ``name`` (unknown names raise ``ConfigError``)."""
    return QUANTIZERS.get(name)(**kwargs)  # type: ignore[arg-type]

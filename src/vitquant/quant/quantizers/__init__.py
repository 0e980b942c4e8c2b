"""Quantizers: one method per file, all on the :class:`~.base.Quantizer` interface.

* :mod:`.base`: :class:`QParams`, :class:`Quantizer`, the ``QUANTIZERS`` registry;
* :mod:`.uniform`: ``"uniform"``, calibrated fixed ranges (pytorch-quantization / TensorRT);
* :mod:`.log2`: ``"log2"`` (FQ-ViT) and ``"log2_sqrt2"`` (RepQ-ViT) for softmax outputs.

QAT adds ``"lsq"``, ``"qvit"``, ``"vvtq"`` on the same base class.
"""

from __future__ import annotations

from . import lsq as _lsq  # noqa: F401  (registers "lsq", "lsq+")
from . import qvit as _qvit  # noqa: F401
from . import vvtq as _vvtq  # noqa: F401
from .base import QUANTIZERS, QParams, Quantizer, gran_from_dict, gran_str, gran_to_dict
from .log2 import Log2Quantizer, Log2Sqrt2Quantizer
from .uniform import UniformQuantizer

__all__ = [
    "QUANTIZERS",
    "QParams",
    "Quantizer",
    "UniformQuantizer",
    "Log2Quantizer",
    "Log2Sqrt2Quantizer",
    "gran_from_dict",
    "gran_to_dict",
    "gran_str",
    "build_quantizer",
]


def build_quantizer(name: str, **kwargs: object) -> Quantizer:
    """Instantiates the quantizer registered as ``name`` (unknown names raise ``ConfigError``)."""
    return QUANTIZERS.get(name)(**kwargs)  # type: ignore[arg-type]

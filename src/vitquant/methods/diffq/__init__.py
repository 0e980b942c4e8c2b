"""DiffQ's parameter-level quantizers, rewritten for vitquant.

Follows Défossez, Adi and Synnaeve (2021), "Differentiable Model Compression via Pseudo
Quantization Noise", arXiv 2104.09987, and keeps the calls of its ``diffq`` package:

* :class:`DiffQuantizer`: learnt bits per group of weights through pseudo quantization noise;
  add ``penalty * quantizer.model_size()`` to the loss;
* :class:`UniformQuantizer`: fixed-bit min-max quantization (``qat=True`` for QAT);
* :class:`LSQ`: learnt step size (Esser et al., 2020, arXiv 1902.08153), weights only;
* :func:`restore_quantized_state`: rebuild the weights from a saved state, no quantizer needed;
* :mod:`.method`: the ``--method diffq`` training hooks (DiffQ, or the QAT / LSQ baselines);
  :func:`vitquant.demo.diffq_experiment.run_diffq` fine-tunes a trained float run with them.

Every quantizer has the methods of :class:`~vitquant.methods.diffq.base.BaseQuantizer`:
``setup_optimizer``, ``model_size``, ``true_model_size``, ``packed_model_size``,
``compressed_model_size``, ``get_quantized_state``, ``restore_quantized_state``, ``quantize``,
``unquantize``, ``enter_quantize`` and ``detach``. States are plain data and load with
``torch.load(..., weights_only=True)``; see ``docs/diffq.md``.
"""

from __future__ import annotations

from vitquant.methods.diffq.api import (
    QUANTIZERS,
    load_quantized_state,
    make_quantizer,
    restore_quantized_state,
    save_quantized_state,
)
from vitquant.methods.diffq.base import BaseQuantizer, QuantizedParam
from vitquant.methods.diffq.diffq import DiffQuantizer
from vitquant.methods.diffq.lsq import LSQ
from vitquant.methods.diffq.method import DiffQMethod, DiffQMethodConfig
from vitquant.methods.diffq.state import check_state
from vitquant.methods.diffq.uniform import UniformQuantizer

__all__ = [
    "BaseQuantizer",
    "QuantizedParam",
    "DiffQuantizer",
    "UniformQuantizer",
    "LSQ",
    "QUANTIZERS",
    "make_quantizer",
    "restore_quantized_state",
    "save_quantized_state",
    "load_quantized_state",
    "check_state",
    "DiffQMethod",
    "DiffQMethodConfig",
]

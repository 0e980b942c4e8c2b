"""Real int8 inference: integer GEMM kernels, integer modules and :func:`lower`.

Typical use::

    from vitquant.quant import QuantConfig, prepare, calibrate
    from vitquant.runtime import lower
    model = calibrate(prepare(model, QuantConfig(preset="ft1")), loader)
    lower(model)                      # in place: int8 GEMMs (oneDNN on CPU, _int_mm on CUDA)
    logits = model(images)
    fast = torch.compile(model)       # Inductor fuses the float work around the int8 kernels

Kernels are picked by the CPU's ISA (:func:`cpu_isa`: AMX, AVX512-VNNI, AVX2; ``VITQUANT_ISA``
forces a lower level) and ``lowering_report(model)`` says which it took.

See ``docs/int8.md`` for the kernels, the fused blocks and measured speeds.
"""

from __future__ import annotations

from vitquant.runtime.fused import Int8Attention, Int8Block, Int8Mlp
from vitquant.runtime.isa import ISA_LEVELS, CpuIsa, cpu_isa
from vitquant.runtime.kernels import (
    BACKENDS,
    ActQ,
    PackedWeight,
    check_backend,
    default_backend,
    int8_bmm,
    int8_linear,
    onednn_available,
    quantize_act,
    quantize_fast,
)
from vitquant.runtime.lower import is_lowered, lower, lowering_report, uncalibrated_quantizers
from vitquant.runtime.modules import Int8Linear, Int8MatMul
from vitquant.runtime.speed import measure_speedup, weight_bytes

__all__ = [
    "lower",
    "lowering_report",
    "is_lowered",
    "uncalibrated_quantizers",
    "measure_speedup",
    "weight_bytes",
    "BACKENDS",
    "ActQ",
    "PackedWeight",
    "check_backend",
    "default_backend",
    "onednn_available",
    "quantize_act",
    "quantize_fast",
    "cpu_isa",
    "CpuIsa",
    "ISA_LEVELS",
    "int8_linear",
    "int8_bmm",
    "Int8Linear",
    "Int8MatMul",
    "Int8Attention",
    "Int8Mlp",
    "Int8Block",
]

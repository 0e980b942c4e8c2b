"""Quantization presets: which quantization points each mode enables.

``ft1``/``ft2``/``ft3``/``trt`` reproduce the modes of NVIDIA FasterTransformer's ViT
quantization example (``examples/pytorch/vit/ViT-quantization/quant_utils.py:set_args``), which
disables quantizers by keyword: ft1 disables layernorm/softmax inputs, residual and local inputs and
the after-GEMM outputs, with per-channel weights; ft2 re-enables the softmax input and the
after-GEMM outputs with per-tensor weights and one scale shared by q, k and v (in vitquant the fused
``qkv`` Linear has one input, one weight and one output quantizer, which *is* that sharing); ft3
adds the residual inputs of the two adds; trt disables only layernorm/softmax/after-GEMM. ``repq``
is vitquant's ViT-specific PTQ set (RepQ-ViT, arXiv 2212.08254): ft1's points with a log-sqrt2
softmax-output quantizer, asymmetric activations and LayerNorm reparameterisation. ``robust``,
the default of :class:`~vitquant.quant.QuantConfig`, is ft1's points with per-channel weights and
SmoothQuant's outlier migration (the calibration pass ``smooth``, Xiao et al., arXiv
2211.10438), which keeps models with activation outliers close to float at W8A8 and lowers to
per-tensor int8 GEMMs. The exact tables are in ``docs/ptq.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitquant.errors import ConfigError

__all__ = ["POINT_KINDS", "Preset", "PRESETS", "PRESET_ALIASES", "resolve_preset"]

#: Every kind of quantization point that ``prepare`` knows, with what it quantizes.
POINT_KINDS: dict[str, str] = {
    "linear_input": "input of every Linear (FT: *_input_quantizer of query/key/value/out/fc1/fc2)",
    "weight": "weight of every Linear (and Conv2d when the patch embedding is quantized)",
    "aftergemm": "Linear output before the bias (FT: _aftergemm_quantizer)",
    "matmul_input": "q and k of q·kᵀ, v of attn·v (FT: matmul_{q,k,v}_input_quantizer)",
    "softmax_output": "attention probabilities, the attn operand of attn·v (FT: matmul_a_input)",
    "softmax_input": "attention scores q·kᵀ entering the softmax (FT: softmax_input_quantizer)",
    "residual_input": "skip input of each residual add (FT: add{1,2}_residual_input_quantizer)",
    "local_input": "branch input of each residual add (FT: add{1,2}_local_input_quantizer)",
    "layernorm_input": "input of the block LayerNorms (FT: layernorm_input{1,2}_quantizer)",
    "matmul_output": "output of attn·v and q·kᵀ (not in FasterTransformer; off in every preset)",
}

_GEMM = frozenset({"linear_input", "weight", "matmul_input", "softmax_output"})


@dataclass(frozen=True)
class Preset:
    """Point kinds a preset enables and the defaults it sets for unset config fields."""

    points: frozenset[str]
    weight_granularity: str = "tensor"
    softmax_quantizer: str = "uniform"
    ln_reparam: bool = False
    act_symmetric: bool = True
    calibrator: str = "percentile"
    passes: tuple[str, ...] = ()
    pass_options: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    description: str = ""


PRESETS: dict[str, Preset] = {
    "ft1": Preset(_GEMM, "channel", description="FT mode 1: GEMM inputs/weights, INT32 outputs"),
    "ft2": Preset(
        _GEMM | {"softmax_input", "aftergemm"},
        "tensor",
        description="FT mode 2: ft1 + softmax input + INT8 GEMM outputs, per-tensor weights",
    ),
    "ft3": Preset(
        _GEMM | {"softmax_input", "aftergemm", "residual_input"},
        "tensor",
        description="FT mode 3: ft2 + residual inputs of the adds",
    ),
    "trt": Preset(
        _GEMM | {"residual_input", "local_input"},
        "tensor",
        description="TensorRT mode: everything but layernorm/softmax inputs and GEMM outputs",
    ),
    "repq": Preset(
        _GEMM,
        "channel",
        softmax_quantizer="log2_sqrt2",
        ln_reparam=True,
        act_symmetric=False,
        description="ViT-specific PTQ (RepQ-ViT): ft1 points, log-sqrt2 softmax, LN reparam",
    ),
    "weight_only": Preset(frozenset({"weight"}), "channel", description="weights only"),
    "robust": Preset(
        _GEMM,
        "channel",
        passes=("smooth",),
        pass_options=(("smooth", (("alpha", 0.5), ("progress", False), ("act_error_ratio", 0.5))),),
        description="vitquant's default: ft1 points, per-channel weights, SmoothQuant (alpha 0.5) "
        "folded into LayerNorm, and into the fc2 input where that halves fc2's error",
    ),
    "lowbit": Preset(
        _GEMM,
        "channel",
        calibrator="mse",
        passes=("smooth", "output_mse", "reconstruct"),
        pass_options=(
            ("smooth", (("alpha", "search"), ("progress", False))),
            ("reconstruct", (("iterations", 200), ("batch_size", 16))),
        ),
        description="vitquant's best PTQ at 6 bits and below: robust + MSE ranges, SmoothQuant "
        "strength searched per layer, output-MSE ranges, block reconstruction (AdaRound/BRECQ)",
    ),
}

#: ``--quant-mode 1`` / ``2`` as the seed's README writes them.
PRESET_ALIASES: dict[str, str] = {"1": "ft1", "2": "ft2"}


def resolve_preset(name: str | int) -> str:
    """Canonical preset name (``1 -> "ft1"``); unknown names raise :class:`ConfigError`."""
    key = str(name).strip().lower()
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise ConfigError(
            f"unknown preset {name!r}; use one of {', '.join(PRESETS)} (or 1/2 for ft1/ft2)"
        )
    return key

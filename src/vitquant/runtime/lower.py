"""``lower(model)``: turn a calibrated (PTQ) or QAT-trained fake-quant model into integer modules.

The lowering reads each quantizer's :class:`~vitquant.quant.QParams` and replaces, in place:

1. every pre-norm transformer block whose GEMMs are W8A8-lowerable by a fused
   :class:`~vitquant.runtime.fused.Int8Block` (activations stay uint8/int8 between ops);
2. every remaining ``QuantLinear`` by an :class:`~vitquant.runtime.modules.Int8Linear`;
3. every remaining ``QuantMatMul`` with both operands quantized by an
   :class:`~vitquant.runtime.modules.Int8MatMul`.

Kernels are picked by the CPU's instruction sets (:func:`~vitquant.runtime.isa.cpu_isa`: AMX,
AVX512-VNNI, AVX2 or none; ``VITQUANT_ISA`` or ``isa=`` forces a lower level) and the report says
which level and kernels it took. ``float_dtype=torch.bfloat16`` keeps the residual stream and the
float GEMM outputs in bfloat16 (LayerNorm, softmax and every quantization still compute in
float32).

What cannot run on integer kernels (log2 quantizers, per-group weights, more than 8 bits, a
QuantConv2d patch embedding) keeps its fake-quant module, which computes the same function in
float; :func:`lowering_report` lists those modules and why. Quantizers that are enabled but were
never calibrated make :func:`lower` refuse with a :class:`~vitquant.errors.ConfigError` naming
them (the fake-quant model would silently run them as the identity).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from vitquant.errors import ConfigError
from vitquant.runtime import native
from vitquant.runtime.block_views import torchvision_block_view
from vitquant.runtime.dynamic import DynamicInt8Linear, linear_from_quant
from vitquant.runtime.fused import Int8Block
from vitquant.runtime.isa import cpu_isa
from vitquant.runtime.kernels import check_backend, onednn_available
from vitquant.runtime.modules import Int8Linear, Int8MatMul

__all__ = ["lower", "lowering_report", "uncalibrated_quantizers", "is_lowered"]

_REPORT_ATTR = "_vitquant_int8"


def _quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from vitquant.quant.quantizers import Quantizer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]


def uncalibrated_quantizers(model: nn.Module) -> list[str]:
    """Names of the enabled quantizers that have no range (never calibrated or trained)."""
    return [n for n, q in _quantizers(model) if q.enabled and not q.is_calibrated]


def is_lowered(model: nn.Module) -> bool:
    """True when :func:`lower` has run on ``model``."""
    return hasattr(model, _REPORT_ATTR)


def lowering_report(model: nn.Module) -> dict[str, Any]:
    """What :func:`lower` did: ``{"backend", "isa", "attention", "attention_note",
    "float_dtype", "blocks", "linears", "matmuls", "dynamic", "smoothed", "kept"}``.

    ``isa`` is :meth:`~vitquant.runtime.isa.CpuIsa.as_dict` (level taken, level detected, flags;
    None on CUDA); ``attention`` the method of the q·kᵀ / attn·v products (``"vnni"``: the
    native AVX512-VNNI kernel, ``"loop"``: int8 GEMM per head, ``"batched"``: one exact float
    GEMM for all heads, ``"batched-bf16"``: the same in bfloat16, ``"reference"``);
    ``attention_note`` why the ISA's choice was not taken ("" when it was);
    ``blocks``/``linears``/``matmuls`` list the names of the lowered modules, ``dynamic`` the
    integer linears (inside blocks too) with per-token dynamic input scales
    (:class:`~vitquant.runtime.dynamic.DynamicInt8Linear`);
    ``smoothed`` the integer linears (inside blocks too) whose input quantization carries
    SmoothQuant factors; ``kept`` maps the name of each quantized module left in fake-quant
    float to the reason.
    """
    if not is_lowered(model):
        raise ConfigError("the model has not been lowered: call vitquant.runtime.lower(model)")
    return dict(getattr(model, _REPORT_ATTR))


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _has_quantizer(m: nn.Module) -> bool:
    from vitquant.quant.quantizers import Quantizer

    return any(isinstance(c, Quantizer) for c in m.children())


def lower(
    model: nn.Module,
    backend: str | None = None,
    *,
    fuse: bool = True,
    warn: bool = True,
    float_dtype: torch.dtype = torch.float32,
    isa: str | None = None,
    attention: str | None = None,
) -> nn.Module:
    """Replaces the fake-quant modules of ``model`` by integer ones, in place; returns ``model``.

    Args:
        model: a prepared and calibrated (or QAT-trained) model, e.g. W8A8 ``ft1``/``ft2``.
        backend: ``"onednn"`` (CPU default), ``"intmm"`` (``torch._int_mm``; CUDA default) or
            ``"reference"`` (exact integer maths in float64, for tests).
        fuse: fuse whole transformer blocks (keeps activations quantized between ops).
        warn: warn when some quantized modules stay in fake-quant float.
        float_dtype: ``torch.float32`` or ``torch.bfloat16``: dtype of the residual stream and
            of the float GEMM outputs inside fused blocks (fast on CPUs with avx512_bf16 or
            AMX; elsewhere it works but torch emulates bfloat16). The output stays float32.
        isa: force a CPU level below the detected one (``"avx512_vnni"``, ``"avx2"``,
            ``"default"``; None: ``$VITQUANT_ISA`` or the CPU's own), to run the fallbacks.
        attention: override the ISA's choice for q·kᵀ / attn·v: ``"vnni"`` (vitquant's
            native AVX512-VNNI kernel, all heads in one call), ``"loop"`` (int8 GEMM per
            head), ``"batched"`` (one exact float32 GEMM) or ``"batched-bf16"`` (the same in
            bfloat16); None: by ISA. Every choice computes the same integers.

    Returns:
        ``model`` in eval mode, for inference only (no gradients through integer modules).

    Raises:
        ConfigError: the model has no quantizers, some enabled quantizers were never calibrated
            (named), it was already lowered, or the backend is unknown/unavailable.
    """
    if is_lowered(model):
        raise ConfigError("the model is already lowered")
    qs = _quantizers(model)
    if not qs:
        raise ConfigError("the model has no quantizers: prepare() and calibrate() it first")
    missing = uncalibrated_quantizers(model)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(
            f"cannot lower: {len(missing)} quantizer(s) were never calibrated: "
            f"{', '.join(missing[:3])}{more} (run calibrate() or load a trained state)"
        )
    if float_dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"float_dtype must be torch.float32 or torch.bfloat16, not {float_dtype}")
    dev = _device(model)
    level = cpu_isa(isa) if dev.type == "cpu" else None
    if backend is None and level is not None:
        backend = "onednn" if level.level != "default" and onednn_available() else "intmm"
    backend = check_backend(backend, dev)
    if attention is None:
        attention, bf16_mm = _attention_method(backend, dev, level)
    elif attention in ("loop", "vnni", "batched", "batched-bf16"):
        attention, bf16_mm = attention.removesuffix("-bf16"), attention.endswith("-bf16")
        if backend == "reference":
            attention, bf16_mm = "reference", False
        elif attention == "vnni" and (dev.type != "cpu" or not native.available()):
            why = "it runs on the CPU" if dev.type != "cpu" else native.why_unavailable()
            raise ConfigError(f"attention='vnni' is unavailable: {why}")
    else:
        raise ConfigError(
            f"unknown attention method {attention!r}; use loop, vnni, batched or batched-bf16"
        )
    model.eval()
    report: dict[str, Any] = {
        "backend": backend,
        "isa": None if level is None else level.as_dict(),
        "attention": "batched-bf16" if bf16_mm else attention,
        "attention_note": (
            f"native VNNI kernel unavailable ({native.why_unavailable()}): {attention}"
            if level is not None
            and level.attention_method == "vnni"
            and attention == level.attention_fallback
            else ""
        ),
        "float_dtype": str(float_dtype).replace("torch.", ""),
        "blocks": [],
        "linears": [],
        "matmuls": [],
    }
    opts: dict[str, Any] = {"attention": attention, "bf16_matmul": bf16_mm}
    kept: dict[str, str] = {}
    with torch.no_grad():
        if fuse:
            from vitquant.quant.modules.torchvision import QuantEncoderBlock

            for name, m in list(model.named_modules()):
                src: nn.Module | None = m
                if isinstance(m, QuantEncoderBlock):  # torchvision: seen as a pre-norm block
                    src = torchvision_block_view(m)
                if not name or src is None or not hasattr(src, "attn") or not hasattr(src, "mlp"):
                    continue
                new, why = Int8Block.from_block(src, backend, float_dtype=float_dtype, **opts)
                if new is not None:
                    _set(model, name, new)
                    report["blocks"].append(name)
            _mark_cast_out(model)
        from vitquant.quant.modules import QuantMatMul

        for name, m in list(model.named_modules()):
            if not name or isinstance(m, (Int8Block, Int8Linear, DynamicInt8Linear, Int8MatMul)):
                continue
            if _inside_lowered(name, report):
                continue
            if isinstance(m, nn.Linear) and _has_quantizer(m):
                lin, why = linear_from_quant(m, backend)
                if lin is None:
                    kept[name] = why
                else:
                    _set(model, name, lin)
                    report["linears"].append(name)
            elif isinstance(m, QuantMatMul):
                mm, why = Int8MatMul.from_quant(m, backend, method=attention, bf16=bf16_mm)
                if mm is None:
                    kept[name] = why
                else:
                    _set(model, name, mm)
                    report["matmuls"].append(name)
            elif isinstance(m, nn.Conv2d) and _has_quantizer(m):
                kept[name] = "convolution (kept in fake-quant float)"
    report["smoothed"] = [
        n
        for n, m in model.named_modules()
        if (isinstance(m, Int8Linear) and m.in_div is not None)
        or (isinstance(m, DynamicInt8Linear) and m.smooth is not None)
    ]
    report["dynamic"] = [n for n, m in model.named_modules() if isinstance(m, DynamicInt8Linear)]
    report["kept"] = kept
    object.__setattr__(model, _REPORT_ATTR, report)
    if warn and kept:
        first = next(iter(kept.items()))
        warnings.warn(
            f"lower: {len(kept)} quantized module(s) stay in fake-quant float, e.g. "
            f"{first[0]} ({first[1]})",
            stacklevel=2,
        )
    return model


def _attention_method(backend: str, dev: torch.device, level: Any) -> tuple[str, bool]:
    """(int_bmm method, bfloat16 batched) for the attention matmuls on this device/ISA."""
    if backend == "reference":
        return "reference", False
    if dev.type != "cpu" or level is None:
        return "batched", False
    method = level.attention_method
    if method == "vnni" and not native.available():
        method = level.attention_fallback
    return method, method == "batched" and level.bf16


def _mark_cast_out(model: nn.Module) -> None:
    """A bfloat16 residual stream goes back to float32 only after the last fused block of each
    run of consecutive fused blocks (inside one container)."""
    for m in model.modules():
        kids = list(m.children())
        for i, k in enumerate(kids):
            if isinstance(k, Int8Block) and k.float_dtype != torch.float32:
                nxt = kids[i + 1] if i + 1 < len(kids) else None
                k.cast_out = not (isinstance(nxt, Int8Block) and nxt.float_dtype == k.float_dtype)


def _inside_lowered(name: str, report: dict[str, Any]) -> bool:
    return any(name.startswith(b + ".") for b in report["blocks"])

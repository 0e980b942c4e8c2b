"""``lower(model)``: turn a calibrated (PTQ) or QAT-trained fake-quant model into integer modules.

The lowering reads each quantizer's :class:`~vitquant.quant.QParams` and replaces, in place:

1. every pre-norm transformer block whose GEMMs are W8A8-lowerable by a fused
   :class:`~vitquant.runtime.fused.Int8Block` (activations stay uint8/int8 between ops);
2. every remaining ``QuantLinear`` by an :class:`~vitquant.runtime.modules.Int8Linear`;
3. every remaining ``QuantMatMul`` with both operands quantized by an
   :class:`~vitquant.runtime.modules.Int8MatMul`.

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
from vitquant.runtime.fused import Int8Block
from vitquant.runtime.kernels import check_backend
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
    """What :func:`lower` did: ``{"backend", "blocks", "linears", "matmuls", "smoothed",
    "kept"}``.

    ``blocks``/``linears``/``matmuls`` list the names of the lowered modules; ``smoothed`` the
    integer linears (inside blocks too) whose input quantization carries SmoothQuant factors;
    ``kept`` maps the name of each quantized module left in fake-quant float to the reason.
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
) -> nn.Module:
    """Replaces the fake-quant modules of ``model`` by integer ones, in place; returns ``model``.

    Args:
        model: a prepared and calibrated (or QAT-trained) model, e.g. W8A8 ``ft1``/``ft2``.
        backend: ``"onednn"`` (CPU default), ``"intmm"`` (``torch._int_mm``; CUDA default) or
            ``"reference"`` (exact integer maths in float64, for tests).
        fuse: fuse whole transformer blocks (keeps activations quantized between ops).
        warn: warn when some quantized modules stay in fake-quant float.

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
    backend = check_backend(backend, _device(model))
    model.eval()
    report: dict[str, Any] = {"backend": backend, "blocks": [], "linears": [], "matmuls": []}
    kept: dict[str, str] = {}
    with torch.no_grad():
        if fuse:
            for name, m in list(model.named_modules()):
                if not name or not hasattr(m, "attn") or not hasattr(m, "mlp"):
                    continue
                new, why = Int8Block.from_block(m, backend)
                if new is not None:
                    _set(model, name, new)
                    report["blocks"].append(name)
        from vitquant.quant.modules import QuantMatMul

        for name, m in list(model.named_modules()):
            if not name or isinstance(m, (Int8Block, Int8Linear, Int8MatMul)):
                continue
            if _inside_lowered(name, report):
                continue
            if isinstance(m, nn.Linear) and _has_quantizer(m):
                lin, why = Int8Linear.from_quant(m, backend)
                if lin is None:
                    kept[name] = why
                else:
                    _set(model, name, lin)
                    report["linears"].append(name)
            elif isinstance(m, QuantMatMul):
                mm, why = Int8MatMul.from_quant(m, backend)
                if mm is None:
                    kept[name] = why
                else:
                    _set(model, name, mm)
                    report["matmuls"].append(name)
            elif isinstance(m, nn.Conv2d) and _has_quantizer(m):
                kept[name] = "convolution (kept in fake-quant float)"
    report["smoothed"] = [
        n for n, m in model.named_modules() if isinstance(m, Int8Linear) and m.in_div is not None
    ]
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


def _inside_lowered(name: str, report: dict[str, Any]) -> bool:
    return any(name.startswith(b + ".") for b in report["blocks"])

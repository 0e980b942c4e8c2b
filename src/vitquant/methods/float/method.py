"""The ``float`` method: plain full-precision training, every hook at its default.

DeiT's recipe (Touvron et al., 2021, arXiv 2012.12877): label-smoothed cross-entropy, optional
soft/hard distillation from ``--teacher``, AdamW/SGD/LAMB with warm-up + cosine.
"""

from __future__ import annotations

from vitquant.methods.base import METHODS, MethodConfig, TrainMethod

__all__ = ["FloatMethod"]


@METHODS.register("float")
class FloatMethod(TrainMethod):
    """Full-precision training (the default method)."""

    name = "float"
    Config = MethodConfig
    summary = "full-precision training (default)"

"""Plain float training (``--method float``, the default): DeiT's recipe with no quantization."""

from __future__ import annotations

from vitquant.methods.float.method import FloatMethod

__all__ = ["FloatMethod"]

"""Deprecated alias of :mod:`vitquant.methods.diffq.uniform` (moved; removed in vitquant 0.3)."""

from vitquant._deprecated import alias

alias(__name__, "vitquant.methods.diffq.uniform")

"""Deprecated alias of :mod:`vitquant.methods.ptq.sweep` (moved; removed in vitquant 0.3)."""

from vitquant._deprecated import alias

alias(__name__, "vitquant.methods.ptq.sweep")

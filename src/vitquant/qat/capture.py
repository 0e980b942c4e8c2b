"""Deprecated alias of :mod:`vitquant.methods.qvit.capture` (moved; removed in vitquant 0.3)."""

from vitquant._deprecated import alias

alias(__name__, "vitquant.methods.qvit.capture")

"""Deprecated alias of :mod:`vitquant.demo.quant` (moved; removed in vitquant 0.3)."""

from vitquant._deprecated import alias

alias(__name__, "vitquant.demo.quant")

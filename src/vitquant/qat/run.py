"""Deprecated alias of :mod:`vitquant.train.qat_run` (moved; removed in vitquant 0.3)."""

from vitquant._deprecated import alias

alias(__name__, "vitquant.train.qat_run")

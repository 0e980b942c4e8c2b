"""The methods: one package per method, each holding everything of that method.

``vitquant/methods/<name>/`` holds a method's quantizer, its calibration or reconstruction, its
losses, its training hooks (a :class:`~vitquant.methods.base.TrainMethod` registered in
:data:`METHODS`) and its model names: ``ptq`` (PTQ grids), ``repq`` (RepQ-ViT's log2
quantizers), ``lsq``, ``ft_qat``, ``qvit``, ``vvtq``, ``diffq`` and ``float`` (plain training).
Two packages are shared machinery, not methods: :mod:`.base` (the plug-in interface and the
registry) and :mod:`.qat` (the QAT scheme builder and :class:`~.qat.method.QATMethod`, base of
LSQ, Q-ViT and VVTQ).

Every sub-package is imported when this package is, so a new method is one new folder
``vitquant/methods/<name>/`` whose ``__init__.py`` imports its modules (which register
themselves with ``@METHODS.register("<name>")``, ``@QUANTIZERS.register(...)``); nothing else
needs editing (``docs/architecture.md`` walks through one). Layers: a method package imports
``vitquant.quant``, ``vitquant.models``, ``vitquant.data``, :mod:`.base` and :mod:`.qat`, never
another method package, ``vitquant.train`` or anything above (``.importlinter``).
"""

from __future__ import annotations

import importlib
import pkgutil

from vitquant.errors import ConfigError
from vitquant.methods.base import METHODS, MethodConfig, MethodContext, StepState, TrainMethod

__all__ = [
    "METHODS",
    "MethodConfig",
    "MethodContext",
    "StepState",
    "TrainMethod",
    "get_method",
    "build_method",
]

#: modules that failed to import: name -> error (reported when that method is asked for)
BROKEN: dict[str, str] = {}


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "qat") and not info.name.startswith("_"):
            try:
                importlib.import_module(f"{__name__}.{info.name}")
            except Exception as e:  # noqa: BLE001  (one broken plug-in must not break the rest)
                BROKEN[info.name.replace("_", "-")] = f"{type(e).__name__}: {e}"


def get_method(name: str) -> type[TrainMethod]:
    """The method class registered as ``name`` (unknown names list the closest ones)."""
    if name not in METHODS and name in BROKEN:
        raise ConfigError(f"training method {name!r} failed to load: {BROKEN[name]}")
    return METHODS.get(name)


def build_method(name: str, options: dict | None = None) -> TrainMethod:
    """An instance of method ``name`` configured from ``{option: value}``."""
    cls = get_method(name)
    return cls(cls.config_from_dict(dict(options or {})))


_import_all()

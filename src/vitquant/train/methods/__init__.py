"""Training methods: the :data:`METHODS` registry of :class:`TrainMethod` subclasses.

Every module in this package is imported when the package is, so a new method is one new file
(``vitquant/train/methods/<name>.py``) that registers itself with ``@METHODS.register("<name>")``;
nothing else needs editing. See :mod:`vitquant.train.methods.base` for the hooks.
"""

from __future__ import annotations

import importlib
import pkgutil

from vitquant.errors import ConfigError
from vitquant.registry import Registry
from vitquant.train.methods.base import MethodConfig, MethodContext, StepState, TrainMethod

__all__ = [
    "METHODS",
    "MethodConfig",
    "MethodContext",
    "StepState",
    "TrainMethod",
    "get_method",
    "build_method",
]

METHODS: Registry[type[TrainMethod]] = Registry("training method")


#: modules that failed to import: name -> error (reported when that method is asked for)
BROKEN: dict[str, str] = {}


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
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

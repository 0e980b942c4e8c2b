"""Old import paths of moved modules, kept for one release (removed in vitquant 0.3).

A module that moved leaves a one-line file at its old path: :func:`alias` makes the old name
the new module itself (so ``monkeypatch`` and ``isinstance`` see one object) and warns once with
a :class:`DeprecationWarning` naming the new path. A package whose names went to several homes
uses :func:`forward` for a lazy ``__getattr__``. ``python -m <old path>`` runs the new module.
"""

from __future__ import annotations

import importlib
import runpy
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["alias", "forward"]

REMOVED_IN = "0.3"


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new}; the old path goes away in vitquant {REMOVED_IN}",
        DeprecationWarning,
        stacklevel=4,
    )


def alias(old: str, new: str) -> ModuleType | None:
    """Makes module ``old`` (the caller's ``__name__``) an alias of module ``new``."""
    if old == "__main__":
        runpy.run_module(new, run_name="__main__", alter_sys=True)
        return None
    _warn(old, new)
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module


def forward(old: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for package ``old`` whose names live in ``homes``
    (``{name: new module}``); each access warns and returns the new object."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        _warn(f"{old}.{name}", f"{homes[name]}.{name}")
        return getattr(importlib.import_module(homes[name]), name)

    return __getattr__

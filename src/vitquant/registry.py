"""One small name -> object registry, used for models, quantizers, calibrators and methods."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

from vitquant.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (usually factories) of one kind.

    Example:
        >>> MODELS = Registry("model")
        >>> @MODELS.register("tiny")
        ... def tiny(): ...
        >>> MODELS.get("tiny")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering an object under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Registers ``obj`` under ``name``."""
        self.register(name)(obj)

    def get(self, name: str) -> T:
        """Returns the object registered as ``name``; unknown names list the closest ones."""
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._items), n=5, cutoff=0.4)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style ``pattern``."""
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

"""``vitquant models [pattern]``: list the registered model names (shell-style pattern)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Adds the ``models`` sub-command."""
    p = subparsers.add_parser(
        "models", help="list model names", description="List the registered model names."
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'deit_*'")


def run(args: argparse.Namespace) -> int:
    """Prints one name per line; no match is an error."""
    from vitquant.errors import ConfigError
    from vitquant.models import list_models

    pattern = args.pattern if any(c in args.pattern for c in "*?[") else f"*{args.pattern}*"
    names = list_models(pattern)
    if not names:
        raise ConfigError(f"no model matches {args.pattern!r}; 'vitquant models' lists them all")
    print("\n".join(names))
    return 0

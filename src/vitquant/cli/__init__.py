"""The ``vitquant`` command line: ``vitquant <verb> ...``.

Sub-commands are discovered, not listed: every module ``vitquant/cli/<verb>.py`` (names starting
with ``_`` are skipped; ``_`` in a module name becomes ``-`` in the verb) exposes

* ``add_parser(subparsers) -> None``: adds its sub-parser (``subparsers.add_parser(verb, ...)``);
* ``run(args) -> int``: does the work and returns the exit code.

:func:`main` turns user errors (:class:`~vitquant.errors.VitquantError`, and missing files) into
one line ``error: <message>`` on stderr with exit code 2; ``--debug`` (anywhere on the command
line) shows the traceback instead. A verb module that fails to import is reported when that verb
is used, without breaking the other verbs. ``--config recipe.yaml`` (verbs that declare it, see
:mod:`vitquant.cli._common`) sets the defaults of the verb's options; flags override it.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from vitquant.cli._common import apply_config_file
from vitquant.errors import VitquantError

__all__ = ["main", "build_parser", "discover_commands"]


def discover_commands() -> dict[str, ModuleType | BaseException]:
    """``{verb: module}`` of the ``vitquant.cli`` modules (an exception for broken ones)."""
    found: dict[str, ModuleType | BaseException] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        verb = info.name.replace("_", "-")
        try:
            found[verb] = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as e:  # noqa: BLE001  (a broken verb must not break the others)
            found[verb] = e
    return found


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and ``{verb: sub-parser}``."""
    from vitquant._version import __version__

    parser = argparse.ArgumentParser(
        prog="vitquant",
        description="Quantization toolkit for vision transformers: float training, PTQ, QAT, "
        "DiffQ, packed export and int8 inference.",
        epilog="Add --debug anywhere to see tracebacks. 'vitquant <command> --help' for more.",
    )
    parser.add_argument("--version", action="version", version=f"vitquant {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    subparsers.required = True
    for verb, mod in discover_commands().items():
        before = set(subparsers.choices)
        if isinstance(mod, BaseException):
            sub = subparsers.add_parser(verb, help=f"(unavailable: {type(mod).__name__})")
            sub.set_defaults(_broken=mod)
            continue
        try:
            mod.add_parser(subparsers)
        except Exception as e:  # noqa: BLE001
            if verb not in subparsers.choices:
                sub = subparsers.add_parser(verb, help=f"(unavailable: {type(e).__name__})")
            sub = subparsers.choices[verb]
            sub.set_defaults(_broken=e)
            continue
        for name in set(subparsers.choices) - before:
            subparsers.choices[name].set_defaults(_run=mod.run, _verb=name)
    return parser, dict(subparsers.choices)


def _error(message: str) -> int:
    lines = str(message).strip().splitlines() or ["(no message)"]
    print(f"error: {lines[0]}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vitquant`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    args_list = [a for a in args_list if a != "--debug"]
    try:
        parser, subparsers = build_parser()
        args = parser.parse_args(args_list)
        if getattr(args, "_broken", None) is not None:
            e = args._broken
            raise VitquantError(f"command {args.command!r} is unavailable: {type(e).__name__}: {e}")
        args = apply_config_file(parser, subparsers[args.command], args, args_list)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (VitquantError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, VitquantError):
            return _error(str(e))
        name = getattr(e, "filename", None)
        return _error(f"{e.strerror or 'not found'}: {name}" if name else str(e))

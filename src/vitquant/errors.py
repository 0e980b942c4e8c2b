"""User-facing errors.

Every mistake a user can make (bad path, unknown name, mismatched checkpoint, bits out of range)
raises :class:`VitquantError` or a subclass with a one-line message. The CLI prints the message and
exits with code 2; a traceback appears only with ``--debug``.
"""

from __future__ import annotations

__all__ = ["VitquantError", "ConfigError", "DataError", "CheckpointError"]


class VitquantError(Exception):
    """Base class of the errors the CLI reports as one line (exit code 2)."""


class ConfigError(VitquantError, ValueError):
    """An invalid option: unknown name, bits out of range, inconsistent settings."""


class DataError(VitquantError):
    """A dataset that is missing, empty or malformed."""


class CheckpointError(VitquantError):
    """A checkpoint that is corrupt, unsafe to load, or made for another model."""

"""The plain-data quantized state of :mod:`vitquant.methods.diffq`: format constants and checks.

DiffQ (Défossez et al., 2021, arXiv 2104.09987) pickles its quantizer class into the state; here a
state is self-describing plain data (``meta = {"format": "vitquant.methods.diffq", "version": 1,
"method": ..., "init_kwargs": {...}}``), so it loads with ``torch.load(..., weights_only=True)``.
The layout is documented in ``docs/diffq.md``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vitquant.errors import CheckpointError

__all__ = ["STATE_FORMAT", "STATE_VERSION", "check_state", "mismatch_message", "read_bytes"]

STATE_FORMAT = "vitquant.methods.diffq"
STATE_VERSION = 1


def check_state(state: Any, method: str | None = None) -> None:
    """Raises :class:`CheckpointError` unless ``state`` is a vitquant quantized state.

    Args:
        state: the loaded object.
        method: the method the state must come from (``None``: any).
    """
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        hint = ""
        if isinstance(meta, dict) and "klass" in meta:
            hint = " (a state of the original diffq package; restore it there and re-export)"
        raise CheckpointError(f"not a vitquant quantized state{hint}")
    if int(meta.get("version", 0)) > STATE_VERSION:
        raise CheckpointError(
            f"quantized state version {meta['version']} is newer than this vitquant "
            f"({STATE_VERSION}); upgrade vitquant"
        )
    if method is not None and meta.get("method") != method:
        raise CheckpointError(
            f"the state was made by the {meta.get('method')!r} quantizer, not {method!r}"
        )
    for key in ("quantized", "float"):
        if key not in state:
            raise CheckpointError(f"corrupt quantized state: no {key!r} entry")


def mismatch_message(got: list, want: list, kind: str) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return (
                f"state was made for another model: {kind} parameter #{i} is {g!r} in the "
                f"state, {w!r} here"
            )
    return (
        f"state was made for another model: it has {len(got)} {kind} parameters, "
        f"this model {len(want)}"
    )


def read_bytes(data: Tensor | None, offset: int, nbytes: int, name: str) -> Tensor:
    """``data[offset : offset + nbytes]``, or a :class:`CheckpointError` if the buffer is short."""
    if data is None or offset + nbytes > data.numel():
        raise CheckpointError(f"corrupt quantized state: packed data of {name} is truncated")
    return data[offset : offset + nbytes]

"""How a quantizer's scales are shaped: :class:`QParams` and the granularity helpers.

:class:`QParams` is the plain description of a calibrated quantizer (scale, zero point, integer
grid) that export and the int8 runtime use. The helpers name and (de)serialise a granularity
(``PerTensor``, ``PerChannel``, ``PerHead``, ``PerGroup`` of :mod:`vitquant.quant.granularity`)
and reshape a tensor to one row per scale (:func:`rows`), a per-row vector back to the
:class:`QParams` shape (:func:`unrows`) and a stored scale against the tensor (:func:`expand`).
They are re-exported by :mod:`vitquant.quant.quantizers.base` (``rows``, ``unrows`` and
``expand`` as ``_rows``, ``_unrows`` and ``_expand``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from vitquant.errors import ConfigError
from vitquant.quant.granularity import granularity_from_dict

__all__ = [
    "QParams",
    "gran_kind",
    "gran_to_dict",
    "gran_from_dict",
    "gran_str",
    "rows",
    "unrows",
    "expand",
]


@dataclass
class QParams:
    """Everything export and the int8 runtime need to reproduce a quantizer.

    Conventions (``x_q`` integer codes in ``[qmin, qmax]``):

    * ``kind="uniform"``: ``x_hat = (x_q - zero_point) * scale``.
    * ``kind="log2"``: ``x_hat = scale * 2^(-x_q)`` for ``x_q < qmax`` and ``0`` for
      ``x_q == qmax`` (the top code stands for zero); unsigned, ``zero_point`` is 0.
    * ``kind="log2_sqrt2"``: as ``log2`` with base ``sqrt(2)``: ``x_hat = scale * 2^(-x_q / 2)``.
    * ``kind="dynamic"``: uniform codes on a grid computed per token (each index of every
      dimension but the last) from the input itself,
      :func:`~vitquant.quant.primitives.token_qparams`; ``scale`` holds the clip ratio ``[]``
      (:class:`~vitquant.quant.quantizers.dynamic.DynamicQuantizer`).

    Shapes: ``scale`` is ``[]`` per tensor; ``[C]`` per channel along ``axis``; per head it is
    ``[H]`` with ``group_size = C / H`` (consecutive channels along ``axis`` share a scale, over all
    other dimensions); per group it has the tensor's number of dimensions, with the ``axis``
    dimension divided by ``group_size`` (one scale per group and per index of the other dims).
    """

    scale: Tensor
    zero_point: Tensor
    bits: int
    signed: bool
    qmin: int
    qmax: int
    axis: int | None = None
    group_size: int | None = None
    kind: str = "uniform"


def gran_kind(g: Any) -> str:
    """``"tensor" | "channel" | "head" | "group"`` for a granularity object."""
    kind = getattr(g, "kind", None)
    if kind not in ("tensor", "channel", "head", "group"):
        raise ConfigError(f"unsupported granularity {g!r}")
    return str(kind)


def gran_to_dict(g: Any) -> dict[str, Any]:
    """Plain-data description of a granularity (``{"kind": "head", "num_heads": 3, ...}``)."""
    return dict(g.to_dict())


def gran_from_dict(d: dict[str, Any]) -> Any:
    """Inverse of :func:`gran_to_dict`."""
    return granularity_from_dict(d)


def gran_str(g: Any) -> str:
    """Short label for tables: ``tensor``, ``channel(0)``, ``head(3)``, ``group(64)``."""
    kind = gran_kind(g)
    if kind == "channel":
        return f"channel({g.axis})"
    if kind == "head":
        return f"head({g.num_heads})"
    if kind == "group":
        return f"group({g.group_size})"
    return "tensor"


def rows(x: Tensor, g: Any) -> Tensor:
    """Reshapes ``x`` to ``[G, M]``: one row per scale of granularity ``g``."""
    kind = gran_kind(g)
    if kind == "tensor":
        return x.reshape(1, -1)
    axis = g.axis % x.dim()
    c = x.shape[axis]
    if kind == "channel":
        return x.movedim(axis, 0).reshape(c, -1)
    if kind == "head":
        if c % g.num_heads:
            raise ConfigError(f"{c} channels do not split into {g.num_heads} heads")
        return x.movedim(axis, 0).reshape(g.num_heads, -1)
    if c % g.group_size:
        raise ConfigError(f"{c} channels do not split into groups of {g.group_size}")
    return x.movedim(axis, -1).reshape(-1, g.group_size)


def unrows(v: Tensor, x: Tensor, g: Any) -> Tensor:
    """Stores a per-row vector ``[G]`` in the documented :class:`QParams` shape."""
    kind = gran_kind(g)
    if kind == "tensor":
        return v.reshape(())
    if kind in ("channel", "head"):
        return v.reshape(-1)
    axis = g.axis % x.dim()
    moved = list(x.movedim(axis, -1).shape)
    moved[-1] //= g.group_size
    return v.reshape(moved).movedim(-1, axis)


def expand(s: Tensor, x: Tensor, g: Any) -> Tensor:
    """Broadcasts a stored scale/zero point against ``x``."""
    return g.expand(s, x)

"""Quantization granularity: which elements of a tensor share one scale.

Frozen dataclasses in the style of torchao's ``granularity.py``:

* :class:`PerTensor` -- one scale for the whole tensor;
* :class:`PerChannel` -- one scale per index of ``axis`` (per output channel of a weight);
* :class:`PerHead` -- one scale per attention head: the channel ``axis`` (``num_heads * head_dim``
  wide, head-major as in timm's ``qkv`` / ``proj`` layouts) split into ``num_heads`` contiguous
  groups, every other dimension reduced (the per-head scales of Q-ViT, arXiv 2210.06707);
* :class:`PerGroup` -- blocks of ``group_size`` contiguous elements along ``axis``, one scale per
  block and per index of every other dimension (group-wise weight quantization as in GPTQ/AWQ,
  so a ``[out, in]`` weight with ``axis=-1`` gets ``[out, in // group_size]`` scales).

Each one reduces ``|x|`` to the shape of its scales (:meth:`reduce_amax`) and expands a scale of
that shape back so it broadcasts against ``x`` (:meth:`expand`), and round-trips through a plain
dict (:meth:`to_dict` / :func:`granularity_from_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import Tensor

from vitquant.errors import ConfigError
from vitquant.quant.primitives import expand_to

__all__ = [
    "Granularity",
    "PerTensor",
    "PerChannel",
    "PerHead",
    "PerGroup",
    "GRANULARITIES",
    "granularity_from_str",
    "granularity_from_dict",
]


def _norm_axis(axis: int, x: Tensor) -> int:
    if x.dim() == 0 or not -x.dim() <= axis < x.dim():
        raise ConfigError(f"axis={axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return axis % x.dim()


def _split_width(x: Tensor, axis: int, parts: int | None, size: int | None, what: str) -> int:
    """Checks that ``x.shape[axis]`` splits evenly and returns the size of one part."""
    width = x.shape[axis]
    if parts is not None:
        if width % parts:
            raise ConfigError(f"{what}: {width} channels do not split into {parts} heads")
        return width // parts
    assert size is not None
    if width % size:
        raise ConfigError(f"{what}: {width} channels are not a multiple of group_size={size}")
    return size


@dataclass(frozen=True)
class _Base:
    """Shared dict round-trip; subclasses set ``kind`` and implement the two tensor methods."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (``{"kind": ..., **fields}``), inverse of :func:`granularity_from_dict`."""
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Granularity:
        """Same as :func:`granularity_from_dict`."""
        return granularity_from_dict(d)

    def reduce_amax(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``max |x|`` over each group of elements that share a scale."""
        raise NotImplementedError

    def expand(self, scale: Tensor, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Reshapes/repeats ``scale`` (shape of :meth:`reduce_amax`) to broadcast against ``x``."""
        raise NotImplementedError


@dataclass(frozen=True)
class PerTensor(_Base):
    """One scale for the whole tensor; :meth:`reduce_amax` returns a scalar tensor."""

    kind: ClassVar[str] = "tensor"

    def reduce_amax(self, x: Tensor) -> Tensor:
        return x.detach().abs().amax()

    def expand(self, scale: Tensor, x: Tensor) -> Tensor:
        return scale


@dataclass(frozen=True)
class PerChannel(_Base):
    """One scale per index of ``axis``; :meth:`reduce_amax` returns a ``[x.shape[axis]]`` vector."""

    axis: int = 0
    kind: ClassVar[str] = "channel"

    def reduce_amax(self, x: Tensor) -> Tensor:
        axis = _norm_axis(self.axis, x)
        dims = [d for d in range(x.dim()) if d != axis]
        a = x.detach().abs()
        return a.amax(dim=dims) if dims else a

    def expand(self, scale: Tensor, x: Tensor) -> Tensor:
        return expand_to(scale, x, _norm_axis(self.axis, x))


@dataclass(frozen=True)
class PerHead(_Base):
    """One scale per attention head: ``axis`` is split into ``num_heads`` contiguous groups.

    :meth:`reduce_amax` returns a ``[num_heads]`` vector (every other dimension reduced).
    """

    num_heads: int = 1
    axis: int = -1
    kind: ClassVar[str] = "head"

    def __post_init__(self) -> None:
        if isinstance(self.num_heads, bool) or int(self.num_heads) < 1:
            raise ConfigError(f"num_heads={self.num_heads!r} must be a positive integer")

    def reduce_amax(self, x: Tensor) -> Tensor:
        axis = _norm_axis(self.axis, x)
        head_dim = _split_width(x, axis, self.num_heads, None, "PerHead")
        a = x.detach().abs().movedim(axis, -1)
        a = a.reshape(-1, self.num_heads, head_dim)
        return a.amax(dim=(0, 2))

    def expand(self, scale: Tensor, x: Tensor) -> Tensor:
        axis = _norm_axis(self.axis, x)
        head_dim = _split_width(x, axis, self.num_heads, None, "PerHead")
        return expand_to(scale.repeat_interleave(head_dim), x, axis)


@dataclass(frozen=True)
class PerGroup(_Base):
    """Blocks of ``group_size`` contiguous elements along ``axis``, one scale per block.

    :meth:`reduce_amax` keeps every other dimension: the result has ``x``'s shape with
    ``shape[axis]`` replaced by ``shape[axis] // group_size``.
    """

    group_size: int = 128
    axis: int = -1
    kind: ClassVar[str] = "group"

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or int(self.group_size) < 1:
            raise ConfigError(f"group_size={self.group_size!r} must be a positive integer")

    def reduce_amax(self, x: Tensor) -> Tensor:
        axis = _norm_axis(self.axis, x)
        size = _split_width(x, axis, None, self.group_size, "PerGroup")
        shape = list(x.shape)
        shape[axis : axis + 1] = [shape[axis] // size, size]
        return x.detach().abs().reshape(shape).amax(dim=axis + 1)

    def expand(self, scale: Tensor, x: Tensor) -> Tensor:
        axis = _norm_axis(self.axis, x)
        size = _split_width(x, axis, None, self.group_size, "PerGroup")
        return scale.repeat_interleave(size, dim=axis)


Granularity = PerTensor | PerChannel | PerHead | PerGroup

GRANULARITIES: dict[str, type[_Base]] = {
    cls.kind: cls for cls in (PerTensor, PerChannel, PerHead, PerGroup)
}


def granularity_from_str(name: str, **kwargs: Any) -> Granularity:
    """Builds a granularity from its short name.

    Args:
        name: ``"tensor"``, ``"channel"``, ``"head"`` or ``"group"``.
        **kwargs: the dataclass fields (``axis``, ``num_heads`` for ``"head"``, ``group_size``
            for ``"group"``).

    Raises:
        ConfigError: unknown name, unknown field, or a missing ``num_heads`` / ``group_size``.

    Example:
        >>> granularity_from_str("head", num_heads=3)
        PerHead(num_heads=3, axis=-1)
    """
    cls = GRANULARITIES.get(str(name).lower())
    if cls is None:
        raise ConfigError(
            f"unknown granularity {name!r}: use one of {', '.join(sorted(GRANULARITIES))}"
        )
    required = {"head": "num_heads", "group": "group_size"}.get(cls.kind)
    if required is not None and required not in kwargs:
        raise ConfigError(f"granularity {cls.kind!r} needs {required}=...")
    try:
        return cls(**kwargs)  # type: ignore[return-value]
    except TypeError as e:
        raise ConfigError(f"bad arguments for granularity {cls.kind!r}: {kwargs}") from e


def granularity_from_dict(d: dict[str, Any]) -> Granularity:
    """Inverse of ``to_dict()``: ``{"kind": "channel", "axis": 0}`` -> ``PerChannel(axis=0)``."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ConfigError(f"a granularity dict needs a 'kind' key, got {d!r}")
    rest = {k: v for k, v in d.items() if k != "kind"}
    return granularity_from_str(d["kind"], **rest)

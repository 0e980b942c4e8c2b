"""Which CPU instruction sets the int8 runtime can use, and which kernels it picks for them.

The runtime reads the CPU's flags (``/proc/cpuinfo`` on Linux) and torch's own view of the
vector unit (``torch.backends.cpu.get_cpu_capability()``) and sorts the CPU into one level:

* ``"amx"``: Intel AMX (``amx_int8``/``amx_bf16``, Sapphire Rapids and later). oneDNN's int8
  GEMMs run on AMX tiles. These CPUs also have AVX512-VNNI, so attention runs vitquant's native
  kernels as below (softmax and quantization fused into them); where those cannot be built,
  one batched float32 matmul of all heads in bfloat16 on AMX (exact: every code fits
  bfloat16's mantissa, AMX accumulates in float32);
* ``"avx512_vnni"``: AVX512 with VNNI (``vpdpbusd``; Cascade Lake, AMD Zen 4/5). Integer
  GEMMs beat a float32 or bfloat16 ``bmm`` here (measured on Zen 5, see ``docs/int8.md``), so
  attention runs vitquant's native VNNI kernel for all heads at once
  (:mod:`vitquant.runtime.native`; where it cannot be built, a per-head ``torch._int_mm`` loop);
* ``"avx2"``: AVX2 (``vpmaddubsw``); attention loops over heads on one thread (``_int_mm``),
  oneDNN runs its AVX2 code;
* ``"default"``: no AVX2. oneDNN's uint8 path is not worth it: linears use ``torch._int_mm``.

``VITQUANT_ISA`` (one of :data:`ISA_LEVELS`) or ``lower(..., isa=...)`` forces a *lower* level,
so the fallbacks can be tested on a bigger CPU (forcing a level the CPU lacks is refused).
bfloat16 float work (``lower(..., float_dtype=torch.bfloat16)``) is fast only with
``avx512_bf16`` or AMX; elsewhere torch emulates it and :func:`cpu_isa` says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from vitquant.errors import ConfigError

__all__ = ["ISA_LEVELS", "CpuIsa", "cpu_flags", "cpu_isa", "cpu_name"]

#: from the most capable level to the least
ISA_LEVELS = ("amx", "avx512_vnni", "avx2", "default")

_ENV = "VITQUANT_ISA"
_FLAGS: frozenset[str] | None = None
_NAME: str | None = None


def _read_cpuinfo() -> tuple[frozenset[str], str]:
    flags: set[str] = set()
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "model name" and not name:
                    name = value.strip()
                if flags and name:
                    break
    except OSError:
        pass
    return frozenset(flags), name


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` is not readable)."""
    global _FLAGS, _NAME
    if _FLAGS is None:
        _FLAGS, _NAME = _read_cpuinfo()
    return _FLAGS


def cpu_name() -> str:
    """The CPU's model name ("" when unknown)."""
    cpu_flags()
    return _NAME or ""


@dataclass(frozen=True)
class CpuIsa:
    """The level the runtime runs at and what it detected.

    Attributes:
        level: one of :data:`ISA_LEVELS` (after any forcing).
        detected: the level the CPU supports.
        forced: True when ``VITQUANT_ISA`` or an argument lowered it.
        capability: ``torch.backends.cpu.get_cpu_capability()`` (e.g. ``"AVX512"``).
        flags: the relevant flags found (amx_int8, avx512_vnni, avx512_bf16, avx2, ...).
    """

    level: str
    detected: str
    forced: bool
    capability: str
    flags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def bf16(self) -> bool:
        """True when bfloat16 arithmetic is native at this level (AMX or avx512_bf16)."""
        if self.level == "amx":
            return True
        return self.level == "avx512_vnni" and "avx512_bf16" in self.flags

    @property
    def attention_method(self) -> str:
        """How :func:`~vitquant.runtime.kernels.int_bmm` runs attention on the CPU."""
        return "vnni" if self.level in ("amx", "avx512_vnni") else "loop"

    @property
    def attention_fallback(self) -> str:
        """The method where the native kernels cannot be built."""
        return "batched" if self.level == "amx" else "loop"

    def as_dict(self) -> dict[str, object]:
        return {
            "level": self.level,
            "detected": self.detected,
            "forced": self.forced,
            "capability": self.capability,
            "flags": list(self.flags),
            "bf16_native": self.bf16,
            "attention": self.attention_method,
        }


_RELEVANT = (
    "amx_int8", "amx_bf16", "amx_tile", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
    "avx512_fp16", "avx2", "fma",
)  # fmt: skip


def _detect(flags: frozenset[str], capability: str) -> str:
    if {"amx_int8", "amx_tile"} <= flags:
        return "amx"
    if "avx512_vnni" in flags and "avx512f" in flags:
        return "avx512_vnni"
    if "avx2" in flags or capability.upper().startswith(("AVX2", "AVX512")):
        return "avx2"
    return "default"


def cpu_isa(force: str | None = None) -> CpuIsa:
    """The CPU's level, lowered to ``force`` (or ``$VITQUANT_ISA``) when given.

    Raises:
        ConfigError: an unknown level, or one above what the CPU supports.
    """
    flags = cpu_flags()
    capability = str(torch.backends.cpu.get_cpu_capability())
    detected = _detect(flags, capability)
    want = force if force is not None else (os.environ.get(_ENV) or None)
    level = detected
    if want is not None:
        want = want.lower()
        if want not in ISA_LEVELS:
            raise ConfigError(f"unknown ISA level {want!r}; use one of {', '.join(ISA_LEVELS)}")
        if ISA_LEVELS.index(want) < ISA_LEVELS.index(detected):
            raise ConfigError(f"cannot force ISA {want!r}: this CPU only has {detected!r}")
        level = want
    present = tuple(f for f in _RELEVANT if f in flags)
    if ISA_LEVELS.index(level) >= ISA_LEVELS.index("avx2"):  # forced below AVX512: hide them
        present = tuple(f for f in present if f in ("avx2", "fma") and level == "avx2")
    elif level == "avx512_vnni":
        present = tuple(f for f in present if not f.startswith("amx"))
    return CpuIsa(level, detected, level != detected, capability, present)

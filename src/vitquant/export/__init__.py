"""Packed low-bit export: bit packing (:mod:`.bitpack`) and quantized checkpoints (``io.py``)."""

from __future__ import annotations

from vitquant.quant.bitpack import pack, pack_signed, packed_nbytes, unpack, unpack_signed

__all__ = ["pack", "unpack", "pack_signed", "unpack_signed", "packed_nbytes"]

"""Dense bit packing of 1- to 16-bit unsigned integers, in pure torch (no compiled extension).

``pack(values, bits)`` writes the values as one little-endian bit stream: bit ``j`` of value ``i``
is bit number ``i * bits + j`` of the stream, and stream bit ``n`` is bit ``n % 8`` of byte
``n // 8`` (numpy's ``packbits(..., bitorder="little")`` over the values' bits, lowest bit first).
The output holds exactly ``ceil(numel * bits / 8)`` bytes; the unused high bits of the last byte
are zero. This replaces DiffQ's Cython ``bitpack`` (Défossez et al., 2021, arXiv 2104.09987),
whose format pads to 2048 values and stores 64-bit words; the layout here is simpler, has no
padding beyond the last byte, runs on any device and is the one vitquant's exports use.

Everything is vectorised: values are taken 8 at a time (8 values of ``bits`` bits fill exactly
``bits`` bytes), each block is assembled in two int64 words, and the only Python loops run over
the 8 positions of a block and over chunks of a million values (to bound the temporary memory),
never over elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitquant.errors import ConfigError
from vitquant.quant.primitives import check_bits

__all__ = ["pack", "unpack", "pack_signed", "unpack_signed", "packed_nbytes", "MAX_PACK_BITS"]

MAX_PACK_BITS = 16
# blocks of 8 values per chunk (bounds the temporary memory to a few tens of MB)
_CHUNK = 1 << 17


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes :func:`pack` returns for ``numel`` values of ``bits`` bits."""
    bits = check_bits(bits, 1, MAX_PACK_BITS)
    if numel < 0:
        raise ConfigError(f"numel={numel} must be >= 0")
    return (numel * bits + 7) // 8


def _check_values(values: Tensor, lo: int, hi: int, bits: int) -> None:
    if not isinstance(values, Tensor):
        raise ConfigError(f"pack expects a torch.Tensor, got {type(values).__name__}")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ConfigError(f"pack expects an integer tensor, got {values.dtype}")
    if values.numel() and (int(values.min()) < lo or int(values.max()) > hi):
        raise ConfigError(
            f"values in [{int(values.min())}, {int(values.max())}] do not fit in {bits} bits "
            f"(allowed: {lo}..{hi})"
        )


def _pack_blocks(v: Tensor, bits: int) -> Tensor:
    """Packs ``v`` (int64, ``(nblocks, 8)``): each block of 8 values becomes ``bits`` bytes.

    A block is ``8 * bits <= 128`` bits long: its bits 0..63 are built in one int64 word and bits
    64..127 in a second one (two's-complement wrap-around keeps the top bit), then both words are
    cut into bytes.
    """
    low = torch.zeros(v.shape[0], dtype=torch.int64, device=v.device)
    high = torch.zeros_like(low)
    for j in range(8):
        offset = j * bits
        col = v[:, j]
        if offset < 64:
            low |= torch.bitwise_left_shift(col, offset)
            if offset + bits > 64:  # straddles the two words
                high |= torch.bitwise_right_shift(col, 64 - offset)
        else:
            high |= torch.bitwise_left_shift(col, offset - 64)
    shifts = torch.arange(0, 64, 8, device=v.device)
    parts = [torch.bitwise_right_shift(low[:, None], shifts)]
    if bits > 8:
        parts.append(torch.bitwise_right_shift(high[:, None], shifts[: bits - 8]))
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return torch.bitwise_and(out[:, :bits], 255).to(torch.uint8).reshape(-1)


def pack(values: Tensor, bits: int) -> Tensor:
    """Packs unsigned integers of ``bits`` bits into a dense uint8 tensor.

    Args:
        values: integer tensor (any shape, any device) with ``0 <= v < 2**bits``.
        bits: bits per value, 1..16.

    Returns:
        A 1-d uint8 tensor of exactly :func:`packed_nbytes` ``(values.numel(), bits)`` bytes, on
        the device of ``values``.

    Raises:
        ConfigError: ``bits`` outside 1..16, a non-integer tensor, or values that do not fit.

    Example:
        >>> packed = pack(torch.tensor([1, 2, 3]), 2)
        >>> packed.tolist(), unpack(packed, 2, 3).tolist()
        ([57], [1, 2, 3])
    """
    bits = check_bits(bits, 1, MAX_PACK_BITS)
    _check_values(values, 0, (1 << bits) - 1, bits)
    v = values.reshape(-1)
    if bits == 8:
        return v.to(torch.uint8)
    numel = v.numel()
    v = v.to(torch.int64)
    pad = (-numel) % 8
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    blocks = v.view(-1, 8)
    out = torch.cat(
        [_pack_blocks(blocks[i : i + _CHUNK], bits) for i in range(0, blocks.shape[0], _CHUNK)]
        or [torch.empty(0, dtype=torch.uint8, device=v.device)]
    )
    return out[: packed_nbytes(numel, bits)]


def _unpack_blocks(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`_pack_blocks`: ``(nblocks * bits,)`` bytes to ``(nblocks * 8,)`` int32."""
    data = packed.view(-1, bits).to(torch.int64)
    shifts = torch.arange(0, 64, 8, device=packed.device)
    nlow = min(bits, 8)
    low = torch.bitwise_left_shift(data[:, :nlow], shifts[:nlow]).sum(dim=1)
    high = torch.bitwise_left_shift(data[:, nlow:], shifts[: bits - nlow]).sum(dim=1)
    mask = (1 << bits) - 1
    cols = []
    for j in range(8):
        offset = j * bits
        if offset < 64:
            col = torch.bitwise_right_shift(low, offset)
            if offset + bits > 64:
                keep = (1 << (64 - offset)) - 1  # drop the sign extension of the low word
                col = torch.bitwise_and(col, keep) | torch.bitwise_left_shift(high, 64 - offset)
        else:
            col = torch.bitwise_right_shift(high, offset - 64)
        cols.append(torch.bitwise_and(col, mask))
    return torch.stack(cols, dim=1).reshape(-1).to(torch.int32)


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack`: the first ``numel`` values of ``bits`` bits in ``packed``.

    Args:
        packed: 1-d uint8 tensor of at least :func:`packed_nbytes` ``(numel, bits)`` bytes.
        bits: bits per value, 1..16.
        numel: number of values to read.

    Returns:
        A 1-d int32 tensor of ``numel`` values in ``[0, 2**bits)``, on the device of ``packed``.

    Raises:
        ConfigError: ``bits`` outside 1..16, a tensor that is not uint8, or too few bytes.
    """
    nbytes = packed_nbytes(numel, bits)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        kind = packed.dtype if isinstance(packed, Tensor) else type(packed).__name__
        raise ConfigError(f"unpack expects a uint8 tensor, got {kind}")
    packed = packed.reshape(-1)
    if packed.numel() < nbytes:
        raise ConfigError(
            f"packed data holds {packed.numel()} bytes, {nbytes} are needed for "
            f"{numel} values of {bits} bits"
        )
    packed = packed[:nbytes]
    if bits == 8:
        return packed.to(torch.int32)
    nblocks = (numel + 7) // 8
    pad = nblocks * bits - nbytes
    if pad:
        packed = torch.cat([packed, packed.new_zeros(pad)])
    step = _CHUNK * bits  # bytes per chunk of _CHUNK blocks
    out = torch.cat(
        [_unpack_blocks(packed[i : i + step], bits) for i in range(0, packed.numel(), step)]
        or [torch.empty(0, dtype=torch.int32, device=packed.device)]
    )
    return out[:numel]


def pack_signed(values: Tensor, bits: int) -> Tensor:
    """Packs signed integers in ``[-2**(bits-1), 2**(bits-1))`` (offset by ``2**(bits-1)``)."""
    bits = check_bits(bits, 1, MAX_PACK_BITS)
    half = 1 << (bits - 1)
    _check_values(values, -half, half - 1, bits)
    return pack(values.to(torch.int32) + half, bits)


def unpack_signed(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_signed`: int32 values in ``[-2**(bits-1), 2**(bits-1))``."""
    bits = check_bits(bits, 1, MAX_PACK_BITS)
    return unpack(packed, bits, numel) - (1 << (bits - 1))

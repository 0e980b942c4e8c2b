"""Bit packing: round trips for 1..16 bits, exact sizes, numpy's ``packbits`` as the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitquant.errors import ConfigError
from vitquant.quant.bitpack import pack, pack_signed, packed_nbytes, unpack, unpack_signed


def _numpy_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Independent reference: every value's bits, lowest first, through numpy's packbits."""
    v = values.astype(np.int64).reshape(-1, 1)
    planes = ((v >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(planes, bitorder="little")


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1001])
def test_round_trip_random_and_reference(bits: int, numel: int) -> None:
    values = torch.randint(0, 2**bits, (numel,))
    packed = pack(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(numel * bits / 8) == packed_nbytes(numel, bits)
    np.testing.assert_array_equal(packed.numpy(), _numpy_pack(values.numpy(), bits))
    assert torch.equal(unpack(packed, bits, numel).long(), values)


@pytest.mark.parametrize("bits", range(1, 17))
def test_edge_values(bits: int) -> None:
    top = 2**bits - 1
    values = torch.tensor([0, top, top, 0, 1, top - 1, top, 0, 0, top, 1], dtype=torch.int64)
    values = values.clamp(max=top)
    for dtype in (torch.int32, torch.int64) + ((torch.uint8,) if bits <= 8 else (torch.int16,)):
        if dtype == torch.int16 and bits == 16:
            continue  # 65535 does not fit in int16
        packed = pack(values.to(dtype), bits)
        assert torch.equal(unpack(packed, bits, values.numel()).long(), values)
    # all ones packs to 0xff bytes, except the unused high bits of the last byte
    ones = pack(torch.full((13,), top), bits)
    n_bits = 13 * bits
    assert ones[: n_bits // 8].eq(255).all()
    if n_bits % 8:
        assert int(ones[-1]) == 2 ** (n_bits % 8) - 1


def test_shape_and_chunks() -> None:
    """Multi-dimensional input and more values than one internal chunk."""
    values = torch.randint(0, 2**13, (3, 5, 7))
    assert torch.equal(unpack(pack(values, 13), 13, values.numel()).view(3, 5, 7).long(), values)
    big = torch.randint(0, 2**5, (8 * (1 << 17) + 13,))
    assert torch.equal(unpack(pack(big, 5), 5, big.numel()).long(), big)


@pytest.mark.parametrize("bits", [1, 2, 4, 7, 8, 15, 16])
def test_signed_round_trip(bits: int) -> None:
    half = 2 ** (bits - 1)
    values = torch.cat([torch.tensor([-half, half - 1, 0]), torch.randint(-half, half, (100,))])
    packed = pack_signed(values, bits)
    assert packed.numel() == packed_nbytes(values.numel(), bits)
    assert torch.equal(unpack_signed(packed, bits, values.numel()).long(), values)


def test_unpack_reads_a_prefix() -> None:
    a, b = torch.randint(0, 8, (10,)), torch.randint(0, 8, (10,))
    data = torch.cat([pack(a, 3), pack(b, 3)])
    assert torch.equal(unpack(data, 3, 10).long(), a)


@pytest.mark.parametrize(
    ("values", "bits", "match"),
    [
        (torch.tensor([4]), 2, "do not fit in 2 bits"),
        (torch.tensor([-1]), 3, "do not fit"),
        (torch.tensor([1.0]), 3, "integer tensor"),
        (torch.tensor([1]), 0, "bits=0"),
        (torch.tensor([1]), 17, "bits=17"),
    ],
)
def test_bad_input(values: torch.Tensor, bits: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pack(values, bits)


def test_unpack_bad_input() -> None:
    with pytest.raises(ConfigError, match="needed"):
        unpack(torch.zeros(2, dtype=torch.uint8), 5, 4)
    with pytest.raises(ConfigError, match="uint8"):
        unpack(torch.zeros(2, dtype=torch.int32), 5, 1)
    with pytest.raises(ConfigError, match="fit"):
        pack_signed(torch.tensor([2]), 2)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 16),
    data=st.data(),
)
def test_property_round_trip(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=70))
    t = torch.tensor(values, dtype=torch.int64)
    packed = pack(t, bits)
    assert packed.numel() == (len(values) * bits + 7) // 8
    assert unpack(packed, bits, len(values)).tolist() == values
    np.testing.assert_array_equal(packed.numpy(), _numpy_pack(np.array(values, np.int64), bits))

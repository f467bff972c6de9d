"""Bit packing: hand-computed layouts (so a layout bug cannot pass), exact round trips, and the
bytes compressed-tensors itself writes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats.packing import (
    int4_to_nibbles,
    nibbles_to_int4,
    pack_fp4,
    pack_int4_to_int32,
    pack_int4_to_uint8,
    pack_intn_to_int32,
    pack_nibbles,
    unpack_fp4,
    unpack_int32_to_int4,
    unpack_int32_to_intn,
    unpack_nibbles,
    unpack_uint8_to_int4,
)

SHAPES = [(1,), (7,), (8,), (9,), (3, 8), (2, 13), (2, 3, 17), (4, 1), (5, 64), (4, 0)]


def _random_ints(shape, lo: int, hi: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --------------------------------------------------------------------------------------------------
# int32 words (compressed-tensors pack-quantized)


def test_int4_int32_hand_examples() -> None:
    # -8..-1 offset by 8 are fields 0..7; element j in bits 4j..4j+3: 0x76543210.
    q = torch.arange(-8, 0, dtype=torch.int8)
    assert pack_int4_to_int32(q).tolist() == [0x76543210]
    # 0..7 -> fields 8..15: 0xFEDCBA98, whose top bit makes the int32 negative.
    q = torch.arange(0, 8, dtype=torch.int8)
    assert pack_int4_to_int32(q).tolist() == [0xFEDCBA98 - (1 << 32)]
    assert pack_int4_to_int32(torch.full((8,), 7, dtype=torch.int8)).tolist() == [-1]
    # Ragged row [1, -1, 0] -> fields 9, 7, 8, padded with raw 0 fields: 0x00000879.
    p = pack_int4_to_int32(torch.tensor([[1, -1, 0]], dtype=torch.int8))
    assert p.dtype == torch.int32 and p.tolist() == [[0x879]]
    assert unpack_int32_to_int4(p, 3).tolist() == [[1, -1, 0]]
    # The padding fields read back as -8 if the true length is ignored.
    assert unpack_int32_to_int4(p, 8).tolist() == [[1, -1, 0, -8, -8, -8, -8, -8]]


def test_int2_and_int8_int32_hand_examples() -> None:
    # 2 bits: -2..1 offset by 2 -> 0,1,2,3 at bits 0,2,4,6: 0b11100100.
    assert pack_intn_to_int32(torch.tensor([-2, -1, 0, 1], dtype=torch.int8), 2).tolist() == [0b11100100]
    # 8 bits: -128, -1, 0, 127 -> 0x00, 0x7F, 0x80, 0xFF, element 0 in the low byte.
    p = pack_intn_to_int32(torch.tensor([-128, -1, 0, 127], dtype=torch.int8), 8)
    assert p.tolist() == [0xFF807F00 - (1 << 32)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int32_round_trip(bits: int, shape) -> None:
    half = 1 << (bits - 1)
    q = _random_ints(shape, -half, half - 1, seed=len(shape) * 100 + bits, dtype=torch.int8)
    p = pack_intn_to_int32(q, bits)
    per = 32 // bits
    assert p.dtype == torch.int32 and p.shape == (*shape[:-1], -(-shape[-1] // per))
    assert torch.equal(unpack_int32_to_intn(p, shape[-1], bits), q)


def test_int4_every_value_round_trips() -> None:
    q = torch.arange(-8, 8, dtype=torch.int8)
    assert torch.equal(unpack_int32_to_int4(pack_int4_to_int32(q), 16), q)
    assert torch.equal(unpack_uint8_to_int4(pack_int4_to_uint8(q), 16), q)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([2, 4, 8]),
    st.lists(st.integers(min_value=0, max_value=3), min_size=0, max_size=2),
    st.integers(min_value=0, max_value=70),
    st.integers(min_value=0, max_value=2**31),
)
def test_int32_round_trip_property(bits: int, lead: list[int], n: int, seed: int) -> None:
    half = 1 << (bits - 1)
    q = _random_ints((*lead, n), -half, half - 1, seed, torch.int8)
    assert torch.equal(unpack_int32_to_intn(pack_intn_to_int32(q, bits), n, bits), q)


def _ct_helpers():
    # compressed-tensors is a dependency of lowbit: its packers must be there to compare against
    import compressed_tensors.compressors as ct
    return ct


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(3, 8), (5, 13), (2, 64), (4, 1), (6, 100)], ids=str)
def test_int32_bytes_match_compressed_tensors(bits: int, shape) -> None:
    ct = _ct_helpers()
    half = 1 << (bits - 1)
    q = _random_ints(shape, -half, half - 1, seed=shape[1] + bits, dtype=torch.int8)
    theirs = ct.pack_to_int32(q, bits)
    assert torch.equal(pack_intn_to_int32(q, bits), theirs)
    assert torch.equal(unpack_int32_to_intn(theirs, shape[1], bits), q)
    assert torch.equal(ct.unpack_from_int32(pack_intn_to_int32(q, bits), bits, torch.Size(shape)), q)


def test_int32_bad_input() -> None:
    with pytest.raises(ValueError, match="torch.int8"):
        pack_int4_to_int32(torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_to_int32(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_to_int32(torch.tensor([-9], dtype=torch.int8))
    with pytest.raises(ValueError, match="num_bits"):
        pack_intn_to_int32(torch.zeros(8, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="torch.int32"):
        unpack_int32_to_int4(torch.zeros(1, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="last dimension of 2"):
        unpack_int32_to_int4(torch.zeros(1, dtype=torch.int32), 9)


# --------------------------------------------------------------------------------------------------
# Two nibbles per byte (FP4, INT4 two's complement, any 4-bit code)


def test_nibble_hand_examples() -> None:
    # element 2i low, 2i+1 high; odd length padded with a 0 nibble.
    assert pack_nibbles(torch.tensor([1, 2, 3], dtype=torch.uint8)).tolist() == [0x21, 0x03]
    assert unpack_nibbles(torch.tensor([0x21, 0x03], dtype=torch.uint8), 3).tolist() == [1, 2, 3]
    # signed INT4 as two's complement nibbles: -1 -> 0xF, 2 -> 0x2, -8 -> 0x8.
    assert int4_to_nibbles(torch.tensor([-1, 2, -8], dtype=torch.int8)).tolist() == [15, 2, 8]
    assert pack_int4_to_uint8(torch.tensor([-1, 2, -8], dtype=torch.int8)).tolist() == [0x2F, 0x08]
    assert unpack_uint8_to_int4(torch.tensor([0x2F, 0x08], dtype=torch.uint8), 3).tolist() == [-1, 2, -8]
    # FP4 E2M1: 1.0 = 0b0010, -6.0 = 0b1111 -> 0xF2, the byte torch's float4_e2m1fn_x2 documents
    # for (val0, val1) = (1.0, -6.0) (val0 in bits 3..0).
    assert pack_fp4(torch.tensor([0b0010, 0b1111], dtype=torch.uint8)).tolist() == [0xF2]
    assert unpack_fp4(torch.tensor([0xF2], dtype=torch.uint8), 2).tolist() == [0b0010, 0b1111]


def test_every_byte_round_trips() -> None:
    b = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_nibbles(unpack_nibbles(b, 512)), b)
    assert torch.equal(pack_int4_to_uint8(unpack_uint8_to_int4(b, 512)), b)
    c = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(int4_to_nibbles(nibbles_to_int4(c)), c)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nibble_round_trips(shape) -> None:
    codes = _random_ints(shape, 0, 15, seed=sum(shape) + 1, dtype=torch.uint8)
    p = pack_nibbles(codes)
    assert p.dtype == torch.uint8 and p.shape == (*shape[:-1], -(-shape[-1] // 2))
    assert torch.equal(unpack_nibbles(p, shape[-1]), codes)
    assert torch.equal(unpack_fp4(pack_fp4(codes), shape[-1]), codes)
    q = _random_ints(shape, -8, 7, seed=sum(shape) + 2, dtype=torch.int8)
    assert torch.equal(unpack_uint8_to_int4(pack_int4_to_uint8(q), shape[-1]), q)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=3), min_size=0, max_size=2),
    st.integers(min_value=0, max_value=41),
    st.integers(min_value=0, max_value=2**31),
)
def test_nibble_round_trip_property(lead: list[int], n: int, seed: int) -> None:
    codes = _random_ints((*lead, n), 0, 15, seed, torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), n), codes)


E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)


def test_fp4_bytes_match_compressed_tensors_nvfp4() -> None:
    import compressed_tensors.compressors as ct
    codes = _random_ints((6, 32), 0, 15, seed=7, dtype=torch.uint8)
    values = E2M1_VALUES[codes.long()]  # codes are E2M1 bit patterns: sign in bit 3, then eem
    assert torch.equal(pack_fp4(codes), ct.pack_fp4_to_uint8(values))
    back = ct.unpack_fp4_from_uint8(pack_fp4(codes), 6, 32, dtype=torch.float32)
    assert torch.equal(back, values)


def test_nibble_bad_input() -> None:
    with pytest.raises(ValueError, match="torch.uint8"):
        pack_nibbles(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_nibbles(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_to_uint8(torch.tensor([9], dtype=torch.int8))
    with pytest.raises(ValueError, match="torch.int8"):
        pack_int4_to_uint8(torch.tensor([1], dtype=torch.uint8))
    with pytest.raises(ValueError, match="last dimension of 3"):
        unpack_nibbles(torch.zeros(2, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="non-negative"):
        unpack_nibbles(torch.zeros(2, dtype=torch.uint8), -1)

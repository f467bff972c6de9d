"""Bit packing of sub-byte codes, with exact round trips. All packing runs along the last dim.

Two layouts:

* int32 words (compressed-tensors "pack-quantized", used for INT4/INT8 weight-only checkpoints):
  a signed b-bit value q is stored as the unsigned field q + 2**(b-1) (INT4: -8..7 -> 0..15,
  an offset, not two's complement). Element i of a row sits in word i // (32 // b), at bits
  b * (i % (32 // b)) and up: element 0 in the least significant bits. The words are int32, so
  a word whose top field is >= 2**(b-1) reads as a negative number. A row whose length is not a
  multiple of 32 // b is padded at the end with fields of 0 (after the offset, so a padded INT4
  field would read back as -8); the unpacker is told the true length and drops them.
  Supported widths: 2, 4, 8, the ones that divide 32. For 3, 5, 6 and 7 bits compressed-tensors
  releases disagree (older ones leave the top bits of each word unused, newer ones let values
  straddle word boundaries), so those are refused rather than guessed.

* bytes of two nibbles (FP4 E2M1 for NVFP4/MXFP4, or any 4-bit code 0..15): element 2i in the low
  nibble (bits 0-3), element 2i+1 in the high nibble (bits 4-7). This is the layout of torch's
  float4_e2m1fn_x2 (torch/headeronly/util/Float4_e2m1fn_x2.h: val0 in bits 3..0, val1 in bits
  7..4) and of compressed-tensors' NVFP4 `pack_fp4_to_uint8`. An odd-length row gets one code-0
  nibble of padding; the unpacker drops it. Signed INT4 values become nibbles by two's
  complement (-1 -> 0xF) through `int4_to_nibbles` / `nibbles_to_int4`.

Bad input (wrong dtype, a value that does not fit the field, packed shapes that do not match the
stated length) raises ValueError.
"""

from __future__ import annotations

import torch

_INT32_WIDTHS = (2, 4, 8)


def _require_dtype(t: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{what} must be {dtype}, got {t.dtype}")


def _require_range(t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{what} must lie in [{lo}, {hi}], got values from {int(t.min())} to {int(t.max())}")


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    rest = t.shape[-1] % multiple
    return torch.nn.functional.pad(t, (0, multiple - rest)) if rest else t


def _check_packed_len(packed: torch.Tensor, n: int, per: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if packed.shape[-1] != -(-n // per):
        raise ValueError(
            f"{n} values packed {per} to an element need a last dimension of {-(-n // per)}, "
            f"got {packed.shape[-1]}"
        )


def _check_int32_width(num_bits: int) -> int:
    if num_bits not in _INT32_WIDTHS:
        raise ValueError(
            f"int32 packing supports num_bits in {_INT32_WIDTHS} (widths that divide 32), got {num_bits}"
        )
    return 32 // num_bits


def pack_intn_to_int32(q: torch.Tensor, num_bits: int = 4) -> torch.Tensor:
    """Pack signed num_bits-bit values (int8, (..., n)) into int32 words (..., ceil(n / (32 / num_bits))).

    Layout as in the module docstring (compressed-tensors pack-quantized): offset by
    2**(num_bits-1), element 0 of each word in its least significant bits, zero-field padding.
    """
    per = _check_int32_width(num_bits)
    _require_dtype(q, torch.int8, "values to pack into int32")
    offset = 1 << (num_bits - 1)
    _require_range(q, -offset, offset - 1, f"signed {num_bits}-bit values")
    u = _pad_last(q.to(torch.int64) + offset, per)
    shifts = torch.arange(per, device=q.device, dtype=torch.int64) * num_bits
    words = (u.unflatten(-1, (u.shape[-1] // per, per)) << shifts).sum(dim=-1)  # 0 .. 2**32-1
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # same bits, read as int32
    return words.to(torch.int32)


def unpack_int32_to_intn(p: torch.Tensor, n: int, num_bits: int = 4) -> torch.Tensor:
    """Inverse of `pack_intn_to_int32`: int32 (..., ceil(n / (32 / num_bits))) -> int8 (..., n)."""
    per = _check_int32_width(num_bits)
    _require_dtype(p, torch.int32, "packed words")
    _check_packed_len(p, n, per)
    words = p.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, device=p.device, dtype=torch.int64) * num_bits
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    return (fields.flatten(-2)[..., :n] - (1 << (num_bits - 1))).to(torch.int8)


def pack_int4_to_int32(q: torch.Tensor) -> torch.Tensor:
    """INT4 values (int8 in -8..7, (..., n)) -> int32 (..., ceil(n / 8)), compressed-tensors layout.

    Eight per word: element 8k + j of a row is stored as q + 8 in bits 4j..4j+3 of word k.
    """
    return pack_intn_to_int32(q, 4)


def unpack_int32_to_int4(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_int4_to_int32`: int32 (..., ceil(n / 8)) -> int8 (..., n) in -8..7."""
    return unpack_int32_to_intn(p, n, 4)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes (uint8 0..15, (..., n)) per byte -> uint8 (..., ceil(n / 2)).

    Element 2i goes to the low nibble, 2i+1 to the high nibble; odd n is padded with code 0.
    """
    _require_dtype(codes, torch.uint8, "4-bit codes")
    _require_range(codes, 0, 15, "4-bit codes")
    pairs = _pad_last(codes, 2).unflatten(-1, (-(-codes.shape[-1] // 2), 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 (..., ceil(n / 2)) -> uint8 codes (..., n) in 0..15."""
    _require_dtype(packed, torch.uint8, "packed nibbles")
    _check_packed_len(packed, n, 2)
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)[..., :n]


def int4_to_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Signed INT4 (int8 in -8..7) -> its 4-bit two's complement pattern as uint8 0..15 (-1 -> 15)."""
    _require_dtype(q, torch.int8, "signed int4 values")
    _require_range(q, -8, 7, "signed int4 values")
    return (q & 0xF).to(torch.uint8)


def nibbles_to_int4(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of `int4_to_nibbles`: uint8 0..15 read as 4-bit two's complement -> int8 -8..7."""
    _require_dtype(codes, torch.uint8, "4-bit codes")
    _require_range(codes, 0, 15, "4-bit codes")
    c = codes.to(torch.int8)
    return torch.where(c >= 8, c - 16, c)


def pack_int4_to_uint8(q: torch.Tensor) -> torch.Tensor:
    """Signed INT4 (int8 in -8..7, (..., n)) -> uint8 (..., ceil(n / 2)): two's complement nibbles,
    element 2i low. Not the int32 layout: there INT4 is offset by 8, here -1 is stored as 0xF."""
    return pack_nibbles(int4_to_nibbles(q))


def unpack_uint8_to_int4(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_int4_to_uint8`: uint8 (..., ceil(n / 2)) -> int8 (..., n) in -8..7."""
    return nibbles_to_int4(unpack_nibbles(p, n))


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """FP4 (E2M1) bit patterns, uint8 0..15 (sign in bit 3), two per byte: `pack_nibbles`.

    The bytes are those of torch.float4_e2m1fn_x2 (`.view(torch.float4_e2m1fn_x2)` reinterprets
    them without copying) and of the `weight_packed` tensors of compressed-tensors NVFP4 checkpoints.
    """
    return pack_nibbles(codes)


def unpack_fp4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_fp4`: uint8 (..., ceil(n / 2)) -> E2M1 bit patterns uint8 (..., n)."""
    return unpack_nibbles(packed, n)

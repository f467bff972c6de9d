"""Block formats (MX and NVFP4): hand-computed blocks, a scalar reference, properties.

Every MX value is exact in float32 (a power-of-two scale times an element value), so MX tests have
no tolerance. NVFP4 rounds twice in float32 (x / (s * g) and (e * s) * g); the one test with a
tolerance says why next to it.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats.block import (
    BLOCK_FORMATS,
    MXFP4,
    MXFP6_E2M3,
    MXFP6_E3M2,
    MXFP8_E4M3,
    MXFP8_E5M2,
    NVFP4,
    BlockFormat,
    BlockQuantized,
    block_codes,
    block_dequantize,
    block_fake_quantize,
    block_quantize,
    ct_global_scale,
    get_block_format,
)
from lowbit.formats.minifloat import E2M1, E4M3FN, E8M0, Minifloat

MX_FORMATS = [MXFP8_E4M3, MXFP8_E5M2, MXFP6_E2M3, MXFP6_E3M2, MXFP4]
ALL_FORMATS = [*MX_FORMATS, NVFP4]
NAN = float("nan")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN in the same places."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return bool(torch.equal(na, nb) and torch.equal(a[~na], b[~nb]))


def global_scale(q: BlockQuantized) -> torch.Tensor:
    assert q.global_scale is not None
    return q.global_scale


def row(*blocks: list[float], block: int = 32) -> torch.Tensor:
    """One row made of the given blocks, each zero-filled up to `block` values."""
    out = []
    for b in blocks:
        out += list(b) + [0.0] * (block - len(b))
    return torch.tensor([out], dtype=torch.float32)


# --- a scalar reference, written independently of the vectorized code ------------------------------------------
_POSITIVE: dict[str, list[float]] = {}


def rne(y: float, fmt: Minifloat) -> float:
    """y rounded to fmt's grid: nearest, ties to the even code, saturating (pure Python)."""
    if fmt.name not in _POSITIVE:
        vals = fmt.values()
        _POSITIVE[fmt.name] = vals[vals >= 0].tolist()  # ascending; index == code of a positive value
    pos = _POSITIVE[fmt.name]
    a = abs(y)
    if a >= pos[-1]:
        r = pos[-1]
    else:
        i = bisect.bisect_right(pos, a)
        lo, hi = pos[i - 1], pos[i]
        r = lo if a - lo < hi - a else hi if a - lo > hi - a else (lo if (i - 1) % 2 == 0 else hi)
    return math.copysign(r, y)


def ref_mx_block(block: list[float], fmt: BlockFormat) -> tuple[float, list[float]]:
    """(scale, dequantized values) of one MX block, by the spec's formula, in float64 (exact here)."""
    if any(math.isnan(v) or math.isinf(v) for v in block):
        return NAN, [NAN] * len(block)
    amax = max(abs(v) for v in block)
    k = -127 if amax == 0 else min(127, max(-127, math.frexp(amax)[1] - 1 - fmt.element_emax))
    scale = 2.0**k
    return scale, [rne(v / scale, fmt.element) * scale for v in block]


def ref_nvfp4(x: torch.Tensor) -> tuple[float, list[float], list[float]]:
    """(g, block scales, dequantized values) of a 1-D NVFP4 tensor, in numpy float32 scalar arithmetic."""
    f32 = np.float32
    v = [f32(t) for t in x.tolist()]
    blocks = [v[i : i + 16] for i in range(0, len(v), 16)]
    amax_t = max(abs(t) for t in v)
    g = f32(amax_t) / f32(2688.0) if amax_t > 0 else f32(1.0)
    scales, out = [], []
    for b in blocks:
        amax = max(abs(t) for t in b)
        s = f32(rne(float((f32(amax) / f32(6.0)) / g), E4M3FN))
        eff = s * g
        for t in b:
            e = f32(rne(float(t / eff), E2M1)) if eff != 0 else f32(0.0)
            out.append(float((e * s) * g))
        scales.append(float(s))
    return float(g), scales, out


# --- hypothesis data: blocks of float32 values, ties included, each block at its own magnitude ---------------
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 1.0625, 1.1875, 6.0, 448.0, 464.0, 500.0, 0.0]
value = st.one_of(
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(TIES + [-t for t in TIES]),
)


@st.composite
def blocky(draw, block: int, max_blocks: int = 3, exp_range: int = 60) -> torch.Tensor:
    """A (1, n_blocks * block) float32 tensor; each block is scaled by its own power of two."""
    nb = draw(st.integers(1, max_blocks))
    vals = draw(st.lists(value, min_size=nb * block, max_size=nb * block))
    ks = draw(st.lists(st.integers(-exp_range, exp_range), min_size=nb, max_size=nb))
    x = torch.tensor(vals, dtype=torch.float32).view(nb, block)
    return (x * torch.exp2(torch.tensor(ks, dtype=torch.float32)).unsqueeze(-1)).view(1, nb * block)


def half_step(y: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """Half the spacing of fmt's grid at |y| (float64): the largest round-to-nearest error there."""
    _, e = torch.frexp(y.abs())
    e = torch.where(y == 0, fmt.emin, (e - 1).clamp(min=fmt.emin))
    return torch.exp2((e - fmt.mbits).double()) / 2


# --- names ---------------------------------------------------------------------------------------------------
def test_named_formats_and_the_element_exponent() -> None:
    # emax_elem comes from the Minifloat, not a table: the exponent of each element format's largest value.
    assert {f.name: f.element_emax for f in ALL_FORMATS} == {
        "mxfp8_e4m3": 8,
        "mxfp8_e5m2": 15,
        "mxfp6_e2m3": 2,
        "mxfp6_e3m2": 4,
        "mxfp4": 2,
        "nvfp4": 2,
    }
    assert all(f.block_size == 32 and f.scale_format is E8M0 and not f.two_level for f in MX_FORMATS)
    assert NVFP4.block_size == 16 and NVFP4.scale_format is E4M3FN and NVFP4.two_level
    assert get_block_format("mxfp8") is MXFP8_E4M3 and get_block_format("mxfp6") is MXFP6_E2M3
    assert get_block_format("NVFP4") is NVFP4 and set(BLOCK_FORMATS.values()) == set(ALL_FORMATS)
    with pytest.raises(ValueError, match="known: .*mxfp4.*nvfp4"):
        get_block_format("mxfp3")
    assert MXFP4.bits_per_element == 4.25 and NVFP4.bits_per_element == 4.5


def test_with_block_size_and_validation() -> None:
    f = MXFP4.with_block_size(16)
    assert f.block_size == 16 and f.element is E2M1 and f != MXFP4 and MXFP4.block_size == 32
    bads: list[Any] = [0, -1, 2.5, True]
    for bad in bads:
        with pytest.raises(ValueError, match="block_size"):
            MXFP4.with_block_size(bad)
    with pytest.raises(ValueError, match="power-of-two"):
        BlockFormat("bad", E2M1, 32, E4M3FN, two_level=False)


# --- hand-computed blocks ------------------------------------------------------------------------------------
def test_mxfp4_hand_computed() -> None:
    x = row(
        [5.0, 2.5, 0.25, 0.75, 1.25, -3.5, 0.3, 1.75],  # amax 5: X = 2^(2-2) = 1; ties go to even codes
        [7.0, 1.0],  # amax 7: X = 1 and 7 saturates to 6 (a ceil(log2(amax/6)) rule would pick X = 2 -> 8)
        [0.1, -0.03],  # amax 0.1 = 1.6 * 2^-4: X = 2^-6; 6.4 -> 6, -1.92 -> -2
        [8.0, 7.9, 1.0],  # amax 8: X = 2; 4 -> 4, 3.95 -> 4, 0.5 -> 0.5
    )
    q = block_quantize(x, MXFP4)
    assert q.scales.tolist() == [[1.0, 1.0, 2.0**-6, 2.0]]
    v = q.values.view(4, 32)
    # 5 -> 4 (4 = code 0110 even, 6 = 0111), 2.5 -> 2 (0100 vs 0101), 0.25 -> 0, 0.75 -> 1 (0010 vs 0001),
    # 1.25 -> 1 (0010 vs 0011), -3.5 -> -4 (1110 vs 1101), 0.3 -> 0.5, 1.75 -> 2 (0100 vs 0011)
    assert v[0, :8].tolist() == [4.0, 2.0, 0.0, 1.0, 1.0, -4.0, 0.5, 2.0]
    assert v[1, :2].tolist() == [6.0, 1.0]
    assert v[2, :2].tolist() == [6.0, -2.0]
    assert v[3, :3].tolist() == [4.0, 4.0, 0.5]
    d = block_dequantize(q).view(4, 32)
    assert d[2, :2].tolist() == [6 * 2.0**-6, -2 * 2.0**-6] and d[3, :3].tolist() == [8.0, 8.0, 1.0]
    elem, sc = block_codes(q)
    assert sc.tolist() == [[127, 127, 121, 128]]  # E8M0 code = exponent + 127
    assert elem.view(4, 32)[0, :8].tolist() == [6, 4, 0, 2, 2, 14, 1, 4]


def test_mxfp8_e4m3_hand_computed_clips_the_top_of_a_block() -> None:
    x = row(
        [500.0, 300.0, -1.0, 17.0],  # amax 500 = 1.95 * 2^8: X = 2^(8-8) = 1; 500 > 448 saturates
        [1.0, 2.0**-17, 3 * 2.0**-19, 2.0**-18],  # amax 1: X = 2^-8; the rest land on E4M3 subnormals
    )
    q = block_quantize(x, MXFP8_E4M3)
    assert q.scales.tolist() == [[1.0, 2.0**-8]]
    d = block_dequantize(q).view(2, 32)
    # 300 -> 288 (step 32 in [256, 512)), 17 ties between 16 (mantissa 000) and 18 (001) -> 16
    assert d[0, :4].tolist() == [448.0, 288.0, -1.0, 16.0]
    # /X: 256 -> 256; 2^-9 (smallest subnormal) exact; 0.75 * 2^-9 -> 2^-9; 2^-10 ties to 0
    assert d[1, :4].tolist() == [1.0, 2.0**-17, 2.0**-17, 0.0]
    assert block_codes(q)[1].tolist() == [[127, 119]]


@pytest.mark.parametrize("fmt", MX_FORMATS, ids=lambda f: f.name)
def test_top_of_a_block_every_mx_format(fmt: BlockFormat) -> None:
    top = fmt.element.max
    just_under_next_pow2 = 2.0 ** (fmt.element_emax + 1) * (1 - 2.0**-24)
    x = row([top * 2.0**-20, -(2.0**-21)], [just_under_next_pow2 * 2.0**5, 1.0])
    q = block_quantize(x, fmt)
    # amax = max * 2^j sits in the binade 2^(emax + j): X = 2^j and the element is max itself;
    # amax just under 2^(emax + 1 + j) is in the same binade: same X, and it saturates to max.
    assert q.scales.tolist() == [[2.0**-20, 2.0**5]]
    assert q.values.view(2, 32)[:, 0].tolist() == [top, top]


def test_nvfp4_hand_computed() -> None:
    x = row(
        [1344.0, 100.0, -700.0],  # tensor amax 1344: g = 1344 / 2688 = 0.5; s = 1344 / 6 / 0.5 = 448
        [57.0, 45.0, -50.0, 10.0],  # 57 / 6 / 0.5 = 19, a tie between 18 (E4M3 mantissa 001) and 20 (010): 20
        [0.001, -0.0005],  # 0.001 / 6 / 0.5 = 3.3e-4 < 2^-10 (half the smallest subnormal): s = 0
        [],  # all zero: s = 0
        block=16,
    )
    q = block_quantize(x, NVFP4)
    assert q.global_scale is not None and q.global_scale.item() == 0.5 and q.global_scale.dim() == 0
    assert ct_global_scale(q.global_scale).item() == 2.0  # compressed-tensors' 448 * 6 / amax
    assert q.scales.tolist() == [[448.0, 20.0, 0.0, 0.0]]
    v = q.values.view(4, 16)
    # block 0, s * g = 224: 6, 0.446 -> 0.5, -3.125 -> -3; block 1, s * g = 10: 5.7 -> 6, 4.5 -> 4 and
    # -5 -> -4 (ties to even), 1 -> 1; blocks 2 and 3: zero elements, not NaN
    assert v[0, :3].tolist() == [6.0, 0.5, -3.0] and v[1, :4].tolist() == [6.0, 4.0, -4.0, 1.0]
    assert not bool(v[2:].any())
    d = block_dequantize(q).view(4, 16)
    assert d[0, :3].tolist() == [1344.0, 112.0, -672.0] and d[1, :4].tolist() == [60.0, 40.0, -40.0, 10.0]
    assert not bool(d[2:].any()) and not bool(torch.isnan(d).any())
    elem, sc = block_codes(q)
    assert sc.tolist() == [[0x7E, 0x5A, 0, 0]]  # 448 = 0 1111 110, 20 = 1.25 * 2^4 = 0 1011 010
    assert elem.view(4, 16)[0, :3].tolist() == [7, 1, 13]


# --- special values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_all_zero_block_is_exactly_zero(fmt: BlockFormat) -> None:
    x = torch.cat([torch.zeros(1, fmt.block_size), -torch.ones(1, fmt.block_size)], dim=-1)
    q = block_quantize(x, fmt)
    # MX: the smallest E8M0 scale 2^-127 (code 0); NVFP4: a zero block scale (code 0)
    assert q.scales[0, 0].item() == (0.0 if fmt.two_level else 2.0**-127)
    assert block_codes(q)[1][0, 0].item() == 0
    d = block_dequantize(q).view(2, fmt.block_size)
    assert not bool(d[0].any()) and d[1].tolist() == [-1.0] * fmt.block_size
    assert not bool(block_fake_quantize(torch.zeros(3, fmt.block_size * 2), fmt).any())


def test_all_zero_tensor_gets_global_scale_one() -> None:
    q = block_quantize(torch.zeros(2, 32), NVFP4)
    assert q.global_scale is not None and q.global_scale.item() == 1.0 and not bool(q.scales.any())


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("bad", [NAN, float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_makes_its_block_nan_and_only_its_block(fmt: BlockFormat, bad: float) -> None:
    bs = fmt.block_size
    x = torch.linspace(-3, 3, 3 * bs).view(1, -1)
    x[0, bs + 2] = bad
    q = block_quantize(x, fmt)
    assert math.isnan(q.scales[0, 1].item()) and not bool(torch.isnan(q.scales[0, [0, 2]]).any())
    d = block_dequantize(q)
    assert bool(torch.isnan(d[0, bs : 2 * bs]).all())
    clean = x.clone()
    clean[0, bs : 2 * bs] = 0.0  # the other blocks are what they would be without the bad block
    ref = block_dequantize(block_quantize(clean, fmt))
    assert torch.equal(d[0, :bs], ref[0, :bs]) and torch.equal(d[0, 2 * bs :], ref[0, 2 * bs :])
    elem, sc = block_codes(q)
    assert sc[0, 1].item() == fmt.scale_format.nan_code()  # E8M0 0xFF, E4M3FN 0x7F
    assert not bool(elem[0, bs : 2 * bs].any())  # elements of a NaN block are written as code 0


# --- shapes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [MXFP4, NVFP4], ids=lambda f: f.name)
def test_ragged_last_dim_refused_unless_padded(fmt: BlockFormat) -> None:
    x = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"does not divide the last dimension 40.*pad=True"):
        block_quantize(x, fmt)
    q = block_quantize(x, fmt, pad=True)
    padded_len = -(-40 // fmt.block_size) * fmt.block_size
    assert q.values.shape == (2, 3, padded_len) and q.scales.shape == (2, 3, padded_len // fmt.block_size)
    assert q.orig_len == 40
    d = block_dequantize(q)
    assert d.shape == x.shape
    # zero padding changes no block's amax: the same as quantizing the explicitly padded tensor, trimmed
    explicit = torch.nn.functional.pad(x, (0, padded_len - 40))
    assert torch.equal(d, block_fake_quantize(explicit, fmt)[..., :40])
    assert torch.equal(block_fake_quantize(x, fmt, pad=True), d)


def test_leading_expert_dim_is_kept() -> None:
    x = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(1))
    x = x * torch.tensor([1.0, 1e3, 1e-3]).view(3, 1, 1)  # experts of very different magnitudes
    for fmt in MX_FORMATS:
        q = block_quantize(x, fmt)
        assert q.values.shape == x.shape and q.scales.shape == (3, 4, 2)
        assert torch.equal(block_dequantize(q), torch.stack([block_fake_quantize(e, fmt) for e in x]))
    # NVFP4: one global scale for the whole tensor by default; one per expert when passed (E, 1, 1)
    q = block_quantize(x, NVFP4)
    assert q.global_scale is not None and q.global_scale.dim() == 0
    g = torch.stack([global_scale(block_quantize(e, NVFP4)) for e in x]).view(3, 1, 1)
    per_expert = block_fake_quantize(x, NVFP4, global_scale=g)
    assert torch.equal(per_expert, torch.stack([block_fake_quantize(e, NVFP4) for e in x]))


@pytest.mark.parametrize("bs", [1, 3, 7, 64])
def test_any_block_size(bs: int) -> None:
    x = torch.randn(5, 2 * 3 * 7 * 64, generator=torch.Generator().manual_seed(bs))
    for fmt in (MXFP4.with_block_size(bs), NVFP4.with_block_size(bs)):
        q = block_quantize(x, fmt)
        assert q.scales.shape == (5, x.shape[-1] // bs) and block_dequantize(q).shape == x.shape
    # block size 1: every value has its own power-of-two scale; 0.3 = 1.2 * 2^-2: X = 2^-4, 4.8 -> 4
    one = block_fake_quantize(torch.tensor([5.0, 0.3, 7.0, -0.0]), MXFP4.with_block_size(1))
    assert one.tolist() == [4.0, 0.25, 6.0, 0.0]


def test_dtypes_and_argument_checks() -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    for fmt in ALL_FORMATS:
        xb = x.bfloat16()
        y = block_fake_quantize(xb, fmt)
        assert y.dtype == torch.bfloat16 and torch.equal(y, block_fake_quantize(xb.float(), fmt).bfloat16())
        assert block_dequantize(block_quantize(x, fmt), torch.float16).dtype == torch.float16
        xt = x.repeat(1, 2).t()  # (128, 4), not contiguous: blocks still run along its last dim
        assert torch.equal(
            block_fake_quantize(xt, fmt.with_block_size(4)),
            block_fake_quantize(xt.contiguous(), fmt.with_block_size(4)),
        )
    with pytest.raises(ValueError, match="no global scale"):
        block_quantize(x, MXFP4, global_scale=1.0)
    for bad in (0.0, -1.0, NAN, float("inf")):
        with pytest.raises(ValueError, match="global_scale"):
            block_quantize(x, NVFP4, global_scale=bad)
    with pytest.raises(ValueError, match="at least one dimension"):
        block_quantize(torch.tensor(1.0), MXFP4)
    with pytest.raises(ValueError, match="floating-point"):
        block_quantize(torch.ones(32, dtype=torch.int32), MXFP4)


# --- properties ----------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.sampled_from(MX_FORMATS), st.data())
def test_mx_matches_the_scalar_reference(fmt: BlockFormat, data: st.DataObject) -> None:
    x = data.draw(blocky(fmt.block_size))
    q = block_quantize(x, fmt)
    blocks = x.view(-1, fmt.block_size).tolist()
    ref = [ref_mx_block(b, fmt) for b in blocks]
    assert q.scales.view(-1).tolist() == [s for s, _ in ref]
    assert block_dequantize(q).view(-1).tolist() == [v for _, vs in ref for v in vs]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_nvfp4_matches_the_scalar_reference(data: st.DataObject) -> None:
    x = data.draw(blocky(16, max_blocks=4, exp_range=12))
    g, scales, values = ref_nvfp4(x.view(-1))
    q = block_quantize(x, NVFP4)
    assert q.global_scale is not None and q.global_scale.item() == g
    assert q.scales.view(-1).tolist() == scales
    assert block_dequantize(q).view(-1).tolist() == values


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(MX_FORMATS), st.data())
def test_mx_error_is_at_most_half_a_step_or_the_saturation(fmt: BlockFormat, data: st.DataObject) -> None:
    x = data.draw(blocky(fmt.block_size))
    q = block_quantize(x, fmt)
    scale = q.scales.double().repeat_interleave(fmt.block_size, dim=-1)
    y = x.double() / scale  # exact: the scale is a power of two
    err = (x.double() - block_dequantize(q).double()).abs()
    bound = torch.maximum(half_step(y, fmt.element), y.abs() - fmt.element.max) * scale
    assert bool((err <= bound).all())  # no tolerance: every quantity here is exact in float64
    # scales are powers of two in E8M0's range
    m, e = torch.frexp(q.scales)
    assert bool((m == 0.5).all()) and bool(((e - 1 >= -127) & (e - 1 <= 127)).all())


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_nvfp4_error_is_at_most_half_a_step_or_the_saturation(data: st.DataObject) -> None:
    x = data.draw(blocky(16, max_blocks=4, exp_range=12))
    q = block_quantize(x, NVFP4)
    assert q.global_scale is not None
    g = q.global_scale.double()
    assert torch.equal(E4M3FN.round(q.scales), q.scales)  # every block scale is an E4M3FN value
    s = q.scales.double().repeat_interleave(16, dim=-1)
    eff = s * g
    err = (x.double() - block_dequantize(q).double()).abs()
    y = torch.where(eff > 0, x.double() / eff, 0.0)
    e = q.values.double().abs()
    # Tolerance: x / fl(s * g) and (e * s) * g are each rounded in float32, and so is s * g: three
    # relative errors of at most 2^-24 each on quantities of size |y| or |e| (times s * g).
    slack = 2.0**-22 * (y.abs() + e) * eff
    bound = torch.maximum(half_step(y, E2M1), y.abs() - 6.0) * eff + slack
    nonzero = eff > 0
    assert bool((err[nonzero] <= bound[nonzero]).all())
    # a block whose scale rounds to 0 has amax / 6 / g <= 2^-10 (half E4M3's smallest subnormal): error <= amax
    assert bool((err[~nonzero] <= 6 * g * 2.0**-10 * (1 + 2.0**-22)).all())


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(MX_FORMATS), st.data())
def test_mx_fake_quantize_is_idempotent(fmt: BlockFormat, data: st.DataObject) -> None:
    # amax / X is in [2^emax, 2^(emax+1)) and rounds to a value in [2^emax, max]: the block's amax stays
    # in its binade, the scale is the same and the elements are already on the grid.
    x = data.draw(blocky(fmt.block_size))
    once = block_fake_quantize(x, fmt)
    assert torch.equal(block_fake_quantize(once, fmt), once)


def test_nvfp4_global_scale_survives_a_round_trip_for_every_significand() -> None:
    # Fake quantization maps the tensor's amax to (6 * 448) * g; recomputing g from it must give g back.
    # Checked for every float32 amax in [1, 2) (other binades scale by powers of two).
    a = torch.arange(0x3F800000, 0x40000000, dtype=torch.int32).view(torch.float32)
    g = a / 2688.0
    assert torch.equal((2688.0 * g) / 2688.0, g)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_nvfp4_is_idempotent_on_blocks_with_normal_scales(data: st.DataObject) -> None:
    # With the same g (previous test), a normal E4M3 scale is within 1/16 of amax / 6 / g, so the block's
    # largest element is 6 again (5.65 .. 6.2 rounds to 6) and the same scale comes back. Subnormal
    # scales (amax below 2^-6 / 448 of the tensor's) are coarser than that: see the next test.
    x = data.draw(blocky(16, max_blocks=4, exp_range=12))
    q = block_quantize(x, NVFP4)
    once = block_dequantize(q)
    q2 = block_quantize(once, NVFP4)
    assert q.global_scale is not None and q2.global_scale is not None
    assert torch.equal(q2.global_scale, q.global_scale)
    normal = (q.scales >= 2.0**-6).view(-1)
    assert torch.equal(q2.scales.view(-1)[normal], q.scales.view(-1)[normal])
    twice = block_dequantize(q2).view(-1, 16)
    assert torch.equal(twice[normal], once.view(-1, 16)[normal])


def test_nvfp4_is_not_idempotent_with_a_subnormal_block_scale() -> None:
    x = row([2688.0], [0.0186], block=16)  # g = 1
    once = block_fake_quantize(x, NVFP4)
    # 0.0186 / 6 = 0.0031 = 1.59 subnormal steps of 2^-9 -> s = 2^-8; 0.0186 / 2^-8 = 4.76 -> 4: 2^-6
    assert once[0, 16].item() == 2.0**-6
    # again: 2^-6 / 6 = 1.33 steps -> s = 2^-9; 2^-6 / 2^-9 = 8 saturates to 6: 6 * 2^-9
    assert block_fake_quantize(once, NVFP4)[0, 16].item() == 6 * 2.0**-9


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_codes_round_trip_through_decode(fmt: BlockFormat) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4 * fmt.block_size, generator=gen)
    x = x * torch.exp2(torch.randint(-30, 30, (2, 3, 1), generator=gen))  # rows of different magnitudes
    x[0, 0, 5] = NAN
    q = block_quantize(x, fmt)
    elem, sc = block_codes(q)
    assert elem.dtype == sc.dtype == torch.uint8 and elem.shape == x.shape and sc.shape == q.scales.shape
    vals = fmt.element.decode(elem).unflatten(-1, (-1, fmt.block_size))
    out = vals * fmt.scale_format.decode(sc).unsqueeze(-1)
    if fmt.two_level:
        assert q.global_scale is not None
        out = out * q.global_scale
    assert same(out.flatten(-2), block_dequantize(q))
    if not fmt.two_level:  # E8M0 code = log2(scale) + 127
        ok = ~torch.isnan(q.scales)
        assert torch.equal(sc[ok].long() - 127, torch.log2(q.scales[ok]).long())


def test_ct_global_scale_is_the_reciprocal() -> None:
    assert ct_global_scale(0.5).item() == 2.0
    g = torch.tensor(3.0) / 2688.0
    assert ct_global_scale(g).item() == (1.0 / g).item()

"""Integer (INT8/INT4/UINT8/UINT4) and NF4 numerics: exhaustive over the codes, property-based elsewhere."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats.float8 import MIN_SCALE
from lowbit.formats.integer import (
    INT4,
    INT8,
    INT_FORMATS,
    UINT4,
    UINT8,
    IntFormat,
    amin_amax,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    quantize,
    scale_zero_point,
)
from lowbit.formats.nf4 import (
    NF4_LEVELS,
    NF4_MIDPOINTS,
    dequantize_nf4,
    fake_quantize_nf4,
    nf4_levels_from_normal,
    quantize_nf4,
)

ALL_FORMATS = [INT8, INT4, UINT8, UINT4]
EPS32 = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------------------------------
# IntFormat


def test_format_ranges_and_storage() -> None:
    assert (INT8.qmin, INT8.qmax, INT8.storage_dtype) == (-128, 127, torch.int8)
    assert (INT4.qmin, INT4.qmax, INT4.storage_dtype) == (-8, 7, torch.int8)
    assert (UINT8.qmin, UINT8.qmax, UINT8.storage_dtype) == (0, 255, torch.uint8)
    assert (UINT4.qmin, UINT4.qmax, UINT4.storage_dtype) == (0, 15, torch.uint8)
    assert IntFormat("int16", 16, True).storage_dtype == torch.int16
    assert IntFormat("uint12", 12, False).storage_dtype == torch.int16
    assert IntFormat("uint16", 16, False).storage_dtype == torch.int32
    assert INT_FORMATS == {"int8": INT8, "int4": INT4, "uint8": UINT8, "uint4": UINT4}


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_format_refuses_bad_width(bits: int) -> None:
    with pytest.raises(ValueError, match="from 2 to 16"):
        IntFormat("bad", bits, True)


# --------------------------------------------------------------------------------------------------
# Exhaustive round trips over every code


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("scale", [1.0, 0.37, 3.1e-3, 250.0])
def test_every_code_round_trips(fmt: IntFormat, scale: float) -> None:
    codes = torch.arange(fmt.qmin, fmt.qmax + 1).to(fmt.storage_dtype)
    assert codes.numel() == 1 << fmt.bits  # all 16 / 256 codes
    s = torch.tensor([scale])
    for zp_value in (0, fmt.qmin + 3, (fmt.qmin + fmt.qmax) // 2):
        zp = torch.tensor([zp_value], dtype=torch.int32)
        values = dequantize(codes, s, zp)
        # (c - zp) * s divided by s lands within a few float32 ulps of the integer c - zp
        # (|c - zp| <= 255), far from the half-way points, so every code comes back exactly.
        back = quantize(values, s, zp, fmt)
        assert back.dtype == fmt.storage_dtype
        assert torch.equal(back, codes)
        assert torch.equal(dequantize(back, s, zp), values)


def test_int8_symmetric_hand_values() -> None:
    # absmax 31.75 = 127 * 0.25: the scale is exactly 0.25, so x / scale is exact and ties are real ties.
    x = torch.tensor([-31.75, -1.0, 0.0, 1.0, 31.75, 0.125, 0.375, 0.625, -0.375, 40.0])
    scale, zp = scale_zero_point(*amin_amax(x[:5], "tensor", matrix_dims=1), INT8, symmetric=True)
    assert (scale.item(), zp.item()) == (0.25, 0)
    # +-absmax sits on +-127; half steps round to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -1.5 -> -2;
    # 40 is past the range and saturates.
    assert quantize(x, scale, zp, INT8).tolist() == [-127, -4, 0, 4, 127, 0, 2, 2, -2, 127]


def test_uint4_asymmetric_hand_values() -> None:
    x = torch.tensor([[0.25, 0.75, 2.5, 7.5], [-3.0, -2.5, 0.0, 12.0]])
    scale, zp = scale_zero_point(*amin_amax(x, "channel"), UINT4, symmetric=False)
    # row 0: range widened from [0.25, 7.5] to [0, 7.5] -> scale 0.5, zp 0;
    # row 1: [-3, 12] -> scale 1, zp round(0 - (-3) / 1) = 3. Both scales are exact in float32.
    assert scale.squeeze(-1).tolist() == [0.5, 1.0]
    assert zp.squeeze(-1).tolist() == [0, 3]
    # row 0: 0.5 -> 0 and 1.5 -> 2 (ties to even); row 1: -2.5 -> -2 (even), + 3 -> 1.
    assert quantize(x, scale, zp, UINT4).tolist() == [[0, 2, 5, 15], [0, 1, 3, 15]]


# --------------------------------------------------------------------------------------------------
# Property-based


def _tensor_strategy(min_size: int = 1):
    finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
    return st.lists(finite, min_size=min_size, max_size=40).map(
        lambda v: torch.tensor(v, dtype=torch.float32)
    )


fmt_and_mode = st.sampled_from(
    [(INT8, True), (INT8, False), (INT4, True), (INT4, False), (UINT8, False), (UINT4, False)]
)


def _qparams(x: torch.Tensor, fmt: IntFormat, symmetric: bool):
    return scale_zero_point(*amin_amax(x, "tensor", matrix_dims=1), fmt, symmetric=symmetric)


@settings(max_examples=150, deadline=None)
@given(_tensor_strategy(), fmt_and_mode)
def test_fake_quantize_is_idempotent(x: torch.Tensor, fm) -> None:
    fmt, symmetric = fm
    scale, zp = _qparams(x, fmt, symmetric)
    once = fake_quantize(x, scale, zp, fmt)
    # Exact: a grid value (k * s) / s is within a few ulps of the integer k, so it re-rounds to k.
    assert torch.equal(fake_quantize(once, scale, zp, fmt), once)


@settings(max_examples=150, deadline=None)
@given(_tensor_strategy(min_size=2), fmt_and_mode)
def test_quantize_is_monotonic(x: torch.Tensor, fm) -> None:
    fmt, symmetric = fm
    scale, zp = _qparams(x, fmt, symmetric)
    xs = x.sort().values
    q = quantize(xs, scale, zp, fmt).long()
    # Division by a positive scale, rounding and clamping are each non-decreasing.
    assert bool((q[1:] >= q[:-1]).all())


@settings(max_examples=150, deadline=None)
@given(_tensor_strategy(), fmt_and_mode)
def test_error_at_most_half_a_step_inside_the_range(x: torch.Tensor, fm) -> None:
    fmt, symmetric = fm
    scale, zp = _qparams(x, fmt, symmetric)
    s = scale.double()
    err = (fake_quantize(x, scale, zp, fmt).double() - x.double()).abs()
    # Every x lies in its own [amin, amax], so the exact error is <= s/2 (at the ends too: rounding
    # the zero point moves the grid by < s/2, and a value past the last code is within s/2 of it).
    # Slack: the float32 division x/s and product (q - zp) * s each add <= eps/2 relative error,
    # i.e. <= eps * (|x| + s) together; 2x that covers the tie cases where x/s rounds the other way.
    bound = s / 2 + 2 * EPS32 * (x.double().abs() + s)
    assert bool((err <= bound).all()), (err - bound).max()


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(ALL_FORMATS),
    st.floats(min_value=1e-3, max_value=1e3),
    st.floats(min_value=0.0, max_value=1e6),
    st.integers(min_value=-4, max_value=4),
)
def test_saturation_at_qmin_qmax(fmt: IntFormat, scale: float, beyond: float, zp_shift: int) -> None:
    s = torch.tensor([scale])
    zp = torch.tensor([(fmt.qmin + fmt.qmax) // 2 + zp_shift], dtype=torch.int32)
    hi = (fmt.qmax - zp.item()) * scale
    lo = (fmt.qmin - zp.item()) * scale
    x = torch.tensor([hi + beyond, lo - beyond, float("inf"), float("-inf")])
    assert quantize(x, s, zp, fmt).tolist() == [fmt.qmax, fmt.qmin, fmt.qmax, fmt.qmin]


@settings(max_examples=150, deadline=None)
@given(_tensor_strategy(), st.sampled_from([INT8, INT4, UINT8, UINT4]))
def test_asymmetric_keeps_zero_exact(x: torch.Tensor, fmt: IntFormat) -> None:
    scale, zp = _qparams(x, fmt, symmetric=False)
    assert fmt.qmin <= zp.item() <= fmt.qmax
    # Whatever the range (all positive, all negative, straddling 0), 0 maps to code zp and back to 0.
    zeros = torch.zeros(3)
    assert torch.equal(quantize(zeros, scale, zp, fmt), zp.expand(3).to(fmt.storage_dtype))
    assert torch.equal(fake_quantize(zeros, scale, zp, fmt), zeros)


# --------------------------------------------------------------------------------------------------
# Granularities, scales, edge cases


def test_amin_amax_shapes_and_group_refusal() -> None:
    w = torch.randn(3, 4, 32)  # (experts, out, in)
    for strategy, shape in [("tensor", (3, 1, 1)), ("channel", (3, 4, 1)), ("group", (3, 4, 4))]:
        lo, hi = amin_amax(w, strategy, group_size=8)
        assert lo.shape == hi.shape == shape and lo.dtype == torch.float32
    lo, hi = amin_amax(w, "group", group_size=8)
    assert torch.equal(hi[..., 1], w[..., 8:16].amax(dim=-1))
    assert torch.equal(lo[..., 1], w[..., 8:16].amin(dim=-1))
    for bad in (5, None, 0):
        with pytest.raises(ValueError, match="does not divide"):
            amin_amax(w, "group", group_size=bad)
    with pytest.raises(ValueError, match="unknown strategy"):
        amin_amax(w, "row")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt,symmetric", [(INT4, True), (UINT4, False), (INT8, False)])
def test_group_scales_broadcast_like_a_loop(fmt: IntFormat, symmetric: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 64)
    scale, zp = scale_zero_point(*amin_amax(w, "group", group_size=16), fmt, symmetric=symmetric)
    assert scale.shape == zp.shape == (5, 4)
    q = quantize(w, scale, zp, fmt)
    for g in range(4):
        cols = slice(16 * g, 16 * (g + 1))
        s, z = scale[:, g : g + 1], zp[:, g : g + 1]
        assert torch.equal(q[:, cols], quantize(w[:, cols], s, z, fmt))
        assert torch.equal(dequantize(q, scale, zp)[:, cols], dequantize(q[:, cols], s, z))


def test_all_zero_rows_get_min_scale_and_exact_zeros() -> None:
    w = torch.zeros(2, 8)
    for fmt, symmetric in [(INT8, True), (UINT4, False)]:
        scale, zp = scale_zero_point(*amin_amax(w, "channel"), fmt, symmetric=symmetric)
        assert bool((scale == MIN_SCALE).all())
        assert torch.equal(fake_quantize(w, scale, zp, fmt), w)


def test_symmetric_unsigned_refused() -> None:
    with pytest.raises(ValueError, match="unsigned"):
        scale_zero_point(torch.tensor([-1.0]), torch.tensor([1.0]), UINT8, symmetric=True)


def test_nan_input_refused_with_count() -> None:
    x = torch.tensor([1.0, float("nan"), 2.0, float("nan")])
    with pytest.raises(ValueError, match="2 NaN"):
        quantize(x, torch.ones(1), torch.zeros(1, dtype=torch.int32), INT8)


def test_non_finite_range_refused() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        scale_zero_point(torch.tensor([-1.0]), torch.tensor([float("inf")]), INT8, symmetric=False)


def test_fake_quantize_keeps_dtype() -> None:
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    scale, zp = scale_zero_point(*amin_amax(x, "channel"), INT8, symmetric=True)
    y = fake_quantize(x, scale, zp, INT8)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


# --------------------------------------------------------------------------------------------------
# Straight-through estimator


def test_ste_matches_torch_fake_quantize() -> None:
    torch.manual_seed(0)
    # scale 2^-4: x * (1/s) (torch) and x / s (lowbit) are the same exact number, so both agree
    # bit for bit, forward and backward. Values reach well past the range on both sides.
    scale, zp = 2.0**-4, 3
    x = (torch.randn(257) * 8).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    y = fake_quantize_ste(x, torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32), INT8)
    ref = torch.fake_quantize_per_tensor_affine(ref_x, scale, zp, INT8.qmin, INT8.qmax)
    assert torch.equal(y, ref)
    g = torch.randn(257)
    y.backward(g)
    ref.backward(g)
    assert x.grad is not None and ref_x.grad is not None
    assert torch.equal(x.grad, ref_x.grad)
    clipped = (x.detach() > (INT8.qmax - zp + 0.5) * scale) | (x.detach() < (INT8.qmin - zp - 0.5) * scale)
    assert clipped.any() and (~clipped).any()
    assert torch.equal(x.grad, torch.where(clipped, torch.zeros(()), g))


def test_ste_hand_mask() -> None:
    # INT4 symmetric, scale 1: codes -8..7. 7.4 rounds to 7 (kept), 7.6 to 8 (clipped), -8.4 to -8 (kept),
    # -8.6 to -9 (clipped); the gradient is the identity exactly where nothing was clipped.
    x = torch.tensor([0.3, 7.4, 7.6, -8.4, -8.6, 100.0], requires_grad=True)
    y = fake_quantize_ste(x, torch.ones(1), torch.zeros(1, dtype=torch.int32), INT4)
    y.sum().backward()
    assert y.tolist() == [0.0, 7.0, 7.0, -8.0, -8.0, 7.0]
    assert x.grad is not None and x.grad.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------------
# NF4

# Thresholds of bitsandbytes' NF4 decision tree (dQuantizeNF4 in csrc/kernels.cu), ascending.
BNB_NF4_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]  # fmt: skip


def test_nf4_table_shape() -> None:
    assert NF4_LEVELS.dtype == torch.float32 and NF4_LEVELS.numel() == 16
    assert bool((NF4_LEVELS[1:] > NF4_LEVELS[:-1]).all())
    assert (NF4_LEVELS[0].item(), NF4_LEVELS[7].item(), NF4_LEVELS[15].item()) == (-1.0, 0.0, 1.0)


def test_nf4_construction_reproduces_the_table() -> None:
    # Tolerance 0: nf4_levels_from_normal performs the reference construction's roundings in the
    # same order (float32 probabilities, float64 quantiles, float32 storage and normalization), so
    # it must give the very same float32 numbers, not merely close ones.
    assert torch.equal(nf4_levels_from_normal(), NF4_LEVELS)
    # ... and the offset matters: another one gives other levels.
    assert not torch.allclose(nf4_levels_from_normal(0.99), NF4_LEVELS, atol=1e-3)


def test_nf4_midpoints_are_the_bitsandbytes_thresholds() -> None:
    # Exact: the float32 midpoint (a + b) / 2 is the float32 nearest the decimal threshold.
    assert torch.equal(NF4_MIDPOINTS, torch.tensor(BNB_NF4_THRESHOLDS, dtype=torch.float32))


def test_nf4_every_code_round_trips() -> None:
    for absmax in (1.0, 0.0371, 13.5):
        x = (NF4_LEVELS * absmax).repeat(4)  # 64 values = one block, containing +-absmax itself
        codes, am = quantize_nf4(x)
        assert torch.equal(am, torch.tensor([absmax], dtype=torch.float32))
        # levels[c] * a / a is within an ulp of levels[c], far from any midpoint: same code back.
        assert torch.equal(codes, torch.arange(16, dtype=torch.uint8).repeat(4))
        assert torch.equal(dequantize_nf4(codes, am), x)


def test_nf4_nearest_level_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4 * 64, generator=g) * torch.rand(8, 1, generator=g) * 3
    codes, absmax = quantize_nf4(x)
    y = (x.unflatten(-1, (4, 64)) / absmax.unsqueeze(-1)).flatten(-2)
    dist = (y.unsqueeze(-1) - NF4_LEVELS).abs()
    brute = dist.argmin(dim=-1)
    two = dist.topk(2, dim=-1, largest=False).values
    # A value (nearly) equidistant from two levels may go either way depending on float32
    # rounding of the distances; exclude those within 1e-6 (a few ulps of values in [-1, 1]).
    clear = (two[..., 1] - two[..., 0]) > 1e-6
    assert clear.float().mean() > 0.99
    assert torch.equal(codes.long()[clear], brute[clear])


def test_nf4_ties_go_to_the_lower_level() -> None:
    x = torch.cat([torch.tensor([1.0]), NF4_MIDPOINTS, torch.zeros(48)])  # absmax 1: y == x
    codes, _ = quantize_nf4(x)
    # Like bitsandbytes' `x > threshold` test: a value on midpoint k (between levels k, k+1) gets k.
    assert codes[1:16].tolist() == list(range(15))


def test_nf4_zero_blocks() -> None:
    x = torch.randn(2, 192)
    x[0, 64:128] = 0.0
    codes, absmax = quantize_nf4(x)
    assert absmax[0, 1].item() == 0.0
    assert codes[0, 64:128].tolist() == [7] * 64
    y = dequantize_nf4(codes, absmax)
    assert not torch.isnan(y).any()
    assert bool((y[0, 64:128] == 0).all())
    assert torch.equal(fake_quantize_nf4(torch.zeros(64)), torch.zeros(64))


def test_nf4_refuses_or_pads_ragged_rows() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 70)
    with pytest.raises(ValueError, match="not a multiple of block_size"):
        quantize_nf4(x)
    codes, absmax = quantize_nf4(x, pad=True)
    assert codes.shape == (3, 128) and absmax.shape == (3, 2)
    assert bool((codes[:, 70:] == 7).all())  # the zero padding is level 0.0
    # padding does not disturb the real values: same as quantizing the blocks one by one.
    c0, a0 = quantize_nf4(x[:, :64])
    c1, a1 = quantize_nf4(x[:, 64:], block_size=6)
    assert torch.equal(codes[:, :64], c0) and torch.equal(absmax[:, :1], a0)
    assert torch.equal(absmax[:, 1:], a1) and torch.equal(codes[:, 64:70], c1)
    y = dequantize_nf4(codes, absmax, dtype=torch.bfloat16, shape=x.shape)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert torch.equal(y, dequantize_nf4(codes, absmax, dtype=torch.bfloat16)[:, :70])
    assert torch.equal(fake_quantize_nf4(x, pad=True), dequantize_nf4(codes, absmax, shape=x.shape))
    with pytest.raises(ValueError, match="cannot come from"):
        dequantize_nf4(codes, absmax, shape=(3, 20))


def test_nf4_error_bound_and_leading_dims() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    y = fake_quantize_nf4(x, block_size=32)
    assert y.shape == x.shape and y.dtype == x.dtype
    codes, absmax = quantize_nf4(x, block_size=32)
    assert codes.dtype == torch.uint8 and absmax.shape == (2, 3, 4) and int(codes.max()) <= 15
    # Nearest level: error <= half the widest gap (0.7230 .. 1.0) times absmax; in float32 exact
    # arithmetic up to 1e-6 relative (the division and the product, each <= 1 ulp of values <= 1).
    half_gap = ((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2).item()
    err = (dequantize_nf4(codes, absmax, block_size=32) - x.float()).abs().unflatten(-1, (4, 32))
    assert bool((err <= absmax.unsqueeze(-1) * (half_gap + 1e-6)).all())


def test_nf4_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_nf4(torch.tensor([1.0, float("nan")] * 32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_nf4(torch.tensor([1.0, float("inf")] * 32))
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4(torch.zeros(64), block_size=0)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_nf4(torch.zeros(64, dtype=torch.int8), torch.ones(1))
    with pytest.raises(ValueError, match="0..15"):
        dequantize_nf4(torch.full((64,), 16, dtype=torch.uint8), torch.ones(1))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=3), st.integers(min_value=1, max_value=200), st.sampled_from([16, 64])
)
def test_nf4_fake_quantize_is_idempotent(rows: int, n: int, block: int) -> None:
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n * rows))
    once = fake_quantize_nf4(x, block, pad=True)
    # Exact: each block keeps its absmax (its largest value is +-absmax * 1.0) and every value is
    # within an ulp of a level, nowhere near a midpoint.
    assert torch.equal(fake_quantize_nf4(once, block, pad=True), once)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", ["tensor", "channel", "group"])
def test_fast_fake_quantize_equals_quantize_then_dequantize(symmetric: bool, strategy: str) -> None:
    # the chunked in-place path must give exactly the two-step result: same float32 operations
    # (x / s, round half even, + zp, clamp, - zp, * s) in the same order, so no tolerance
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 1100, generator=g) * torch.rand(300, 1, generator=g) * 5  # several chunks, ragged
    x[0, 0], x[1, 1] = float("inf"), float("-inf")
    finite = x.clone()
    finite[~torch.isfinite(finite)] = 0
    amin, amax = amin_amax(finite, strategy, group_size=100)  # type: ignore[arg-type]
    s, zp = scale_zero_point(amin, amax, INT8, symmetric=symmetric)
    fast = fake_quantize(x, s, zp, INT8)
    slow = dequantize(quantize(x, s, zp, INT8), s, zp)
    assert torch.equal(fast, slow)
    assert fake_quantize(x.bfloat16(), s, zp, INT8).dtype == torch.bfloat16

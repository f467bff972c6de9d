"""The generic ExMy simulator: bit-exact against every torch dtype, and against brute force elsewhere.

No test here has a tolerance: every value of every format is a float32 value, so the simulator's
answers are compared for exact equality (NaN compared by position).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lowbit.formats.minifloat import (
    BF16,
    E2M1,
    E2M3,
    E3M2,
    E3M4,
    E4M3FN,
    E4M3FNUZ,
    E5M2,
    E5M2FNUZ,
    E8M0,
    FP16,
    MINIFLOATS,
    TF32,
    Minifloat,
)

TORCH_FORMATS = [E4M3FN, E5M2, E4M3FNUZ, E5M2FNUZ, E8M0, FP16, BF16]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values (with the sign of zero) and NaN in the same places."""
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    a, b = a[~na], b[~nb]
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def torch_decode(fmt: Minifloat, codes: torch.Tensor) -> torch.Tensor:
    assert fmt.dtype is not None
    store = torch.uint8 if fmt.bits == 8 else torch.int16
    return codes.to(torch.int32).to(store).view(fmt.dtype).float()


def random_float32(n: int, seed: int) -> torch.Tensor:
    """Uniformly random float32 bit patterns: every exponent, subnormals, inf and NaN included."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=str)
def test_every_code_decodes_like_torch(fmt: Minifloat) -> None:
    codes = fmt.all_codes()  # all 256 codes of the 8-bit formats, all 65536 of FP16 / BF16
    assert same(fmt.decode(codes), torch_decode(fmt, codes))


@pytest.mark.parametrize("fmt", [*TORCH_FORMATS, E3M4, E3M2, E2M3, E2M1, TF32], ids=str)
def test_every_finite_code_encodes_back(fmt: Minifloat) -> None:
    codes = fmt.all_codes()
    vals = fmt.decode(codes)
    finite = torch.isfinite(vals)
    assert torch.equal(fmt.encode(vals[finite]), codes[finite])
    if fmt.has_nan:
        nan_codes = codes[torch.isnan(vals)]
        assert fmt.nan_code() in nan_codes.tolist()
        assert fmt.encode(torch.tensor([math.nan])).item() == fmt.nan_code()


@pytest.mark.parametrize("fmt", [E4M3FN, E4M3FNUZ, E5M2FNUZ], ids=str)
def test_saturating_round_matches_torch_cast_bit_for_bit(fmt: Minifloat) -> None:
    # torch's cast of an in-range value is the hardware rounding; clamping first makes the
    # comparison independent of whether the installed torch saturates (2.13 CPU) or gives NaN (2.11 CUDA)
    x = random_float32(1 << 20, seed=1)
    ref = x.clamp(-fmt.max, fmt.max).to(fmt.dtype).float()
    assert same(fmt.round(x), ref) or _fnuz_zero_sign_only(fmt, fmt.round(x), ref)
    assert torch.equal(fmt.cast(x).float().nan_to_num(7.0), ref.nan_to_num(7.0))


def _fnuz_zero_sign_only(fmt: Minifloat, a: torch.Tensor, b: torch.Tensor) -> bool:
    """fnuz has no -0: torch returns +0 where the float32 simulation keeps the input's sign."""
    return (
        fmt.convention == "fnuz"
        and same(a + 0.0, b + 0.0)
        and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    )


@pytest.mark.parametrize("fmt", [E5M2, FP16, BF16], ids=str)
def test_ieee_overflow_matches_torch_cast_bit_for_bit(fmt: Minifloat) -> None:
    # IEEE formats in torch overflow to inf under round-to-nearest-even (61440 -> inf in E5M2):
    # saturate=False is exactly that, over every float32 exponent, subnormals, inf and NaN
    x = random_float32(1 << 20, seed=2)
    assert same(fmt.round(x, saturate=False), x.to(fmt.dtype).float())


def test_e5m2_overflow_boundary() -> None:
    # 61440 = 57344 + half a step (4096): a tie, to the even code 0x7C (inf) without saturation
    assert E5M2.round(torch.tensor([61439.0, 61440.0]), saturate=False).tolist() == [57344.0, math.inf]
    assert E5M2.round(torch.tensor([61440.0, math.inf])).tolist() == [57344.0, 57344.0]


def test_e4m3fn_overflow_without_saturation_is_nan() -> None:
    # 464 = 448 + half a step (16): a tie, to the even code 0x7E (448); above it the nearest
    # code is 0x7F (480 in the IEEE pattern), which is E4M3FN's NaN
    r = E4M3FN.round(torch.tensor([464.0, 465.0, 1e9]), saturate=False)
    assert r[0].item() == 448.0 and math.isnan(r[1].item()) and math.isnan(r[2].item())
    assert E4M3FN.round(torch.tensor([464.0, -1e9, -math.inf])).tolist() == [448.0, -448.0, -448.0]


def test_e8m0_against_torch() -> None:
    # every power of two in range agrees with torch; between two of them torch rounds the
    # significand half up (3.0 -> 4), lowbit ties to the even code (3.0 -> 2, code 128), which is
    # what the simulator does for every format; E8M0 is only ever given exact powers of two by MX
    p = torch.exp2(torch.arange(-127, 128).float())
    assert torch.equal(E8M0.round(p), p)
    assert torch.equal(E8M0.encode(p), p.to(torch.float8_e8m0fnu).view(torch.uint8).long())
    x = torch.exp2(torch.rand(10000) * 250 - 125)  # random, not ties
    assert torch.equal(E8M0.round(x), x.to(torch.float8_e8m0fnu).float())
    assert E8M0.round(torch.tensor([3.0, 6.0, 0.0])).tolist() == [2.0, 8.0, 2.0**-127]
    with pytest.raises(ValueError, match="unsigned"):
        E8M0.round(torch.tensor([-1.0]))


def test_named_format_ranges() -> None:
    # the published numbers each format is known by
    expect = {
        "e4m3fn": (448.0, 2.0**-6, 2.0**-9),
        "e5m2": (57344.0, 2.0**-14, 2.0**-16),
        "e2m1": (6.0, 1.0, 0.5),
        "e2m3": (7.5, 1.0, 0.125),
        "e3m2": (28.0, 0.25, 0.0625),
        "fp16": (65504.0, 2.0**-14, 2.0**-24),
        "bf16": (float(torch.finfo(torch.bfloat16).max), 2.0**-126, 2.0**-133),
        "e4m3fnuz": (240.0, 2.0**-7, 2.0**-10),
        "e8m0": (2.0**127, 2.0**-127, 2.0**-127),
    }
    for name, (mx, mn, sub) in expect.items():
        f = MINIFLOATS[name]
        assert (f.max, f.min_normal, f.min_subnormal) == (mx, mn, sub), name
    # E4M3FN: 256 codes, 2 NaN, +-0 -> 253 distinct finite values; E5M2: 6 NaN, 2 inf -> 247
    assert (E4M3FN.num_finite, E5M2.num_finite, E2M1.num_finite, E8M0.num_finite) == (253, 247, 15, 255)


# --- arbitrary formats against brute force ---------------------------------------------------------------------
@st.composite
def formats(draw: st.DrawFn) -> Minifloat:
    ebits = draw(st.integers(1, 8))
    mbits = draw(st.integers(0, 6))
    conv = draw(st.sampled_from(["ieee", "fn", "fnuz", "finite"]))
    if conv == "ieee" and ebits == 1:
        conv = "fn"
    lo_bias = max(-20, 1 - 127)  # a bias can be negative (a range above 1) or large (a range below 1)
    bias = draw(st.one_of(st.none(), st.integers(lo_bias, 2 ** (ebits - 1) + 20)))
    try:
        return Minifloat(ebits, mbits, bias=bias, convention=conv)
    except ValueError:  # a range float32 cannot hold: refused, as tested below
        assume(False)
        raise


def brute_force_round(fmt: Minifloat, x: torch.Tensor) -> torch.Tensor:
    """Nearest finite value by exhaustive search; ties to the even code; saturating; float64 math."""
    codes = fmt.all_codes()
    vals = fmt.decode(codes)
    keep = torch.isfinite(vals)
    vals, codes = vals[keep].double(), codes[keep]
    xd = x.double().clamp(-fmt.max, fmt.max)
    dist = (xd[:, None] - vals[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    cand = dist == best
    # among equally near values prefer the even code (the tie rule); +-0 are both even
    score = cand.double() * 2 + ((codes % 2) == 0).double()[None, :]
    pick = vals[score.argmax(dim=1)]
    return torch.where(x == 0, x.double(), pick).float().copysign(x) if fmt.signed else pick.float()


@settings(max_examples=60, deadline=None)
@given(fmt=formats(), seed=st.integers(0, 2**31 - 1))
def test_round_is_the_nearest_value_ties_to_even(fmt: Minifloat, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 400
    vals = fmt.values()
    # points all over the range: random magnitudes, exact grid values and exact midpoints (ties)
    mags = torch.exp2(
        torch.rand(n, generator=g) * (math.log2(fmt.max) - math.log2(fmt.min_subnormal) + 2)
        + math.log2(fmt.min_subnormal)
        - 1
    )
    pick = vals[torch.randint(0, vals.numel(), (n,), generator=g)]
    pick2 = vals[torch.randint(0, vals.numel(), (n,), generator=g)]
    mids = ((pick.double() + pick2.double()) / 2).float()  # exact in float32 when neighbours
    x = torch.cat([mags, pick, mids, mags * 3])
    if fmt.signed:
        x = x * torch.where(torch.rand(x.numel(), generator=g) < 0.5, -1.0, 1.0)
    else:
        x = x.abs()
    x = x[torch.isfinite(x)]
    got = fmt.round(x)
    assert same(got, brute_force_round(fmt, x)), fmt


@settings(max_examples=60, deadline=None)
@given(fmt=formats(), seed=st.integers(0, 2**31 - 1))
def test_round_properties(fmt: Minifloat, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(2000, generator=g).double()
        * torch.exp2(torch.randint(-30, 30, (2000,), generator=g)).double()
    )
    x = x.float() if fmt.signed else x.float().abs()
    r = fmt.round(x)
    assert torch.equal(fmt.round(r), r)  # idempotent
    xs, _ = x.sort()
    assert bool((fmt.round(xs).diff() >= 0).all())  # monotonic (non-decreasing)
    assert float(r.abs().max()) <= fmt.max  # saturated
    # inside the normal range the error is at most half a step: 2^(e - m - 1) for |x| in [2^e, 2^(e+1))
    inside = (x.abs() >= fmt.min_normal) & (x.abs() <= fmt.max)
    e = torch.floor(torch.log2(x.abs()[inside].double()))
    assert bool(((x[inside].double() - r[inside].double()).abs() <= torch.exp2(e - fmt.mbits - 1)).all())
    if fmt.subnormals:  # below it, half the subnormal step
        below = x.abs() < fmt.min_normal
        step = 2.0 ** (fmt.emin - fmt.mbits)
        assert bool(((x[below] - r[below]).abs() <= step / 2).all())


@pytest.mark.parametrize("fmt", list(MINIFLOATS.values()), ids=str)
def test_specials(fmt: Minifloat) -> None:
    r = fmt.round(torch.tensor([math.nan, math.inf, torch.finfo(torch.float32).max]))
    assert math.isnan(r[0].item()) and r[1].item() == fmt.max and r[2].item() == fmt.max
    if fmt.signed:
        z = fmt.round(torch.tensor([-0.0]))
        assert z.item() == 0 and torch.signbit(z).item()  # the simulation keeps the sign of zero
        neg_zero_code = fmt.encode(torch.tensor([-0.0])).item()
        assert neg_zero_code == (0 if fmt.convention == "fnuz" else 1 << (fmt.ebits + fmt.mbits))
    if not fmt.has_nan:
        with pytest.raises(ValueError, match="no NaN"):
            fmt.encode(torch.tensor([math.nan]))


def test_scaled_round_equals_round_of_scaled() -> None:
    x = torch.randn(3000) * 10
    for fmt in (E4M3FN, E2M1, E3M4):
        s = float(x.abs().max()) / fmt.max
        assert torch.equal(fmt.round(x, scale=s), fmt.round(x / s) * s)
        assert torch.equal(fmt.quantize_dequantize(x, s), fmt.round(x / s) * s)
        ts = torch.full((3000,), s)
        assert torch.equal(fmt.quantize_dequantize(x, ts), fmt.round(x / s) * s)


def test_round_keeps_shape_dtype_and_non_contiguous_input() -> None:
    x = torch.randn(64, 300).t()  # non-contiguous
    r = E4M3FN.round(x)
    assert r.shape == (300, 64) and torch.equal(r, E4M3FN.round(x.contiguous()))
    assert E4M3FN.quantize_dequantize(x.bfloat16(), 0.01).dtype == torch.bfloat16
    big = torch.randn(1 << 19 | 5)  # more than one chunk, with a ragged end
    assert torch.equal(E3M4.round(big), torch.cat([E3M4.round(big[: 1 << 18]), E3M4.round(big[1 << 18 :])]))


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"ebits": 0, "mbits": 0}, "exponent bits"),
        ({"ebits": 9, "mbits": 2}, "exponent bits"),
        ({"ebits": 4, "mbits": 24}, "mantissa bits"),
        ({"ebits": 4, "mbits": 3, "convention": "ocp"}, "unknown convention"),
        ({"ebits": 1, "mbits": 2, "convention": "ieee"}, "no finite normal"),
        ({"ebits": 1, "mbits": 0, "convention": "fn"}, "no finite value besides zero"),
        ({"ebits": 8, "mbits": 7, "bias": 100}, "does not fit in float32"),
        ({"ebits": 8, "mbits": 7, "bias": 200}, "does not fit in float32"),
        ({"ebits": 4, "mbits": 3, "convention": "fnuz", "signed": False}, "sign bit"),
    ],
)
def test_impossible_formats_are_refused(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        Minifloat(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu() -> None:
    # the GPU runs one Triton kernel (lowbit.kernels.triton_round): bit for bit the CPU's result
    x = random_float32(1 << 20, seed=5)
    for fmt in (E4M3FN, E5M2, E3M4, E2M1, BF16, E8M0, Minifloat(8, 23)):
        xs = x.abs() if not fmt.signed else x
        for sat in (True, False):
            assert same(fmt.round(xs.cuda(), saturate=sat).cpu(), fmt.round(xs, saturate=sat)), (fmt, sat)
    g = torch.Generator().manual_seed(6)
    y = torch.randn(2048, 2048, generator=g) * torch.rand(2048, 1, generator=g) * 100
    rows = y.abs().amax(dim=1, keepdim=True) / 448
    for fmt in (E4M3FN, E3M4, E2M1, Minifloat(8, 23), Minifloat(6, 23)):
        for s in (0.37, 3.3, 1 / 448, 0.1234567):  # scales whose division is inexact: needs div.rn
            assert same(fmt.quantize_dequantize(y.cuda(), s).cpu(), fmt.quantize_dequantize(y, s)), (fmt, s)
        assert same(fmt.quantize_dequantize(y.cuda(), rows.cuda()).cpu(), fmt.quantize_dequantize(y, rows))
    bad = torch.tensor([[1.0], [-1.0], [0.0], [float("nan")]], device="cuda")
    r = E4M3FN.quantize_dequantize(torch.ones(4, 3, device="cuda"), bad).cpu()
    assert torch.equal(r[0], torch.ones(3)) and bool(torch.isnan(r[1:]).all())  # NaN, never a wrong number

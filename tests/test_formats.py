"""FP8 numerics: exhaustive over the 256 codes, property-based elsewhere."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import (
    E4M3,
    E5M2,
    absmax,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    quantize,
    scale_from_amax,
)
from lowbit.formats.float8 import MIN_SCALE

ALL_CODES = torch.arange(256, dtype=torch.uint8)


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_every_finite_code_round_trips_bit_for_bit(fmt) -> None:
    codes = ALL_CODES.view(fmt.dtype)
    values = codes.float()
    finite = torch.isfinite(values)
    # A value that is exactly on the grid must come back as the very same code (scale 1: no rounding).
    back = quantize(values[finite], torch.ones(1), fmt)
    assert torch.equal(back.view(torch.uint8), codes[finite].view(torch.uint8))
    # ... and dequantizes to the same value.
    assert torch.equal(dequantize(back, torch.ones(1)), values[finite])
    # E4M3FN: 2 NaN codes (0x7F, 0xFF), no inf: 254 finite values. E5M2: 6 NaN + 2 inf: 248 finite.
    assert int(finite.sum()) == (254 if fmt is E4M3 else 248)
    assert values[finite].abs().max().item() == fmt.max


def test_saturation_not_nan() -> None:
    # Out-of-range values, infinities included, clamp to +-448 regardless of how the installed
    # torch cast behaves (torch 2.13 CPU saturates; torch 2.11 CPU gives NaN for 500).
    x = torch.tensor([500.0, 1e30, float("inf"), -500.0, float("-inf"), 448.0, 464.0])
    q = quantize(x, torch.ones(1)).float()
    assert q.tolist() == [448.0, 448.0, 448.0, -448.0, -448.0, 448.0, 448.0]
    assert math.isnan(quantize(torch.tensor([float("nan")]), torch.ones(1)).float().item())  # NaN stays NaN


def test_round_to_nearest_even_at_midpoints() -> None:
    # Between 1.0 (mantissa 000) and 1.125 (001), 1.0625 is the midpoint: ties go to the even code 1.0.
    # Between 1.125 (001) and 1.25 (010), 1.1875 ties to 1.25 (even mantissa 010).
    x = torch.tensor([1.0625, 1.1875, 1.0625 + 1e-4, 2**-10, 3 * 2**-10])
    # smallest subnormal is 2^-9; 2^-10 is half of it -> ties to 0; 3*2^-10 is 1.5 subnormal steps -> 2 steps.
    assert quantize(x, torch.ones(1)).float().tolist() == [1.0, 1.25, 1.125, 0.0, 2**-8]


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-448, max_value=448, allow_nan=False, width=32))
def test_error_is_at_most_half_an_ulp(v: float) -> None:
    x = torch.tensor([v])
    err = (fake_quantize(x, torch.ones(1)) - x).abs().item()
    a = abs(v)
    # E4M3 has 3 mantissa bits: in binade [2^e, 2^(e+1)) the step is 2^(e-3), so half a step is
    # 2^(e-4); below the smallest normal 2^-6 the step is the subnormal 2^-9 (half: 2^-10).
    half_ulp = 2 ** (math.floor(math.log2(a)) - 4) if a >= 2**-6 else 2**-10
    assert err <= half_ulp


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=2, max_size=64))
def test_idempotent_and_monotonic(vals: list[float]) -> None:
    x = torch.tensor(sorted(vals))
    s = torch.tensor([3.0])
    once = fake_quantize(x, s)
    assert torch.equal(fake_quantize(once, s), once)  # grid values are fixed points
    assert bool((once[1:] >= once[:-1]).all())  # rounding preserves order


def test_fast_dequantize_equals_float32_product() -> None:
    # Every code times a spread of bf16 scales: the bf16 fast path must equal the float32 product
    # rounded once to bf16 (exact equality: both are one correctly rounded operation).
    codes = ALL_CODES.view(torch.float8_e4m3fn)
    codes = codes[torch.isfinite(codes.float())]
    scales = torch.logspace(-12, 2, 97).to(torch.bfloat16)[:, None]  # (97, 1) channel scales
    q = codes[None, :].expand(97, -1)
    fast = dequantize(q, scales, torch.bfloat16)
    slow = (q.float() * scales.float()).to(torch.bfloat16)
    assert torch.equal(fast, slow)


def test_scale_is_rounded_to_storage_dtype() -> None:
    amax = torch.tensor([1.2345678])
    s = scale_from_amax(amax, E4M3, torch.bfloat16)
    assert s.dtype == torch.float32 and torch.equal(s, s.to(torch.bfloat16).float())
    assert scale_from_amax(torch.zeros(1), E4M3, torch.float32).item() == pytest.approx(MIN_SCALE)


def test_granularity_shapes_including_experts() -> None:
    w = torch.randn(4, 8, 16)  # (experts, out, in): each expert keeps its own scales
    assert absmax(w, "tensor").shape == (4, 1, 1)
    assert absmax(w, "channel").shape == (4, 8, 1)
    assert absmax(w, "group", group_size=4).shape == (4, 8, 4)
    assert torch.equal(absmax(w, "tensor")[2], w[2].abs().max().reshape(1, 1))
    x = torch.randn(2, 5, 16)  # (batch, tokens, channels)
    assert absmax(x, "token").shape == (2, 5, 1)
    assert absmax(x, "tensor", matrix_dims=3).shape == (1, 1, 1)
    with pytest.raises(ValueError, match="does not divide"):
        absmax(w, "group", group_size=5)


def test_group_scales_expand_along_last_dim() -> None:
    w = torch.randn(3, 8)
    s = scale_from_amax(absmax(w, "group", group_size=4), E4M3, torch.float32)  # (3, 2)
    q = quantize(w, s)
    assert q.shape == w.shape
    # Each group's largest element maps to +-448 exactly (scale = amax/448, no rounding of a float32 scale).
    assert torch.equal(q.float().abs().unflatten(-1, (2, 4)).amax(-1), torch.full((3, 2), 448.0))


def test_ste_gradient_passes_inside_range_only() -> None:
    x = torch.tensor([0.5, -3.0, 10.0, -10.0], requires_grad=True)
    scale = torch.tensor([4.0 / 448])  # representable range +-4
    fake_quantize_ste(x, scale).sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["tensor", "channel"]))
def test_mse_scale_never_worse_than_minmax(seed: int, strategy: str) -> None:
    from lowbit.formats import mse_scale

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 64, generator=g) * torch.rand(16, 1, generator=g) ** 3  # uneven channel ranges
    amax = absmax(w, strategy)
    s_mm = scale_from_amax(amax, E4M3, torch.bfloat16)
    s_mse = mse_scale(w, amax, E4M3, torch.bfloat16)
    assert s_mse.shape == s_mm.shape and bool((s_mse <= s_mm).all())  # it only shrinks the range
    dims = (1,) if strategy == "channel" else (0, 1)

    def err(s: torch.Tensor) -> torch.Tensor:
        return (fake_quantize(w, s) - w).square().sum(dim=dims)

    # min-max is one of the candidates, so per channel (or per tensor) the chosen error is no larger.
    assert bool((err(s_mse) <= err(s_mm)).all())

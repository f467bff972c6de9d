"""Minifloats with a learned number of mantissa bits (Kuzmin et al. 2022, "FP8 Quantization: The
Power of the Exponent"), for quantization-aware training.

An 8-bit float has 1 sign bit, e exponent bits and m mantissa bits, e + m = 7. Which split suits a
tensor depends on its distribution: more exponent bits cover a wider range, more mantissa bits
are finer within a binade. Here m is a trainable real number, rounded to an integer in the
forward with a straight-through gradient, and the clipping range c (the largest value) is
learned too; e = bits - 1 - m. The grid follows the E4M3FN convention for every split: the
exponent bias is 2^(e-1) - 1, subnormals below the smallest normal, and the top code of the top
binade unused (E4M3FN's NaN), so that m = 3 is exactly the E4M3FN grid with scale c / 448.

Values: x clipped to +-c, divided by sigma = c / max(e, m), rounded to the ExMy grid (ties to
even), times sigma. Gradients: straight-through for x inside the range (zero outside), and for c
and m through sigma and the grid step (the rounding itself passes the gradient straight through),
with each value's exponent differentiated as log2 |x|, as in the paper: there, a normal value's
step is 2^(floor(log2 |x|) - m) in absolute units, so more mantissa bits give a finer grid.
"""

from __future__ import annotations

import torch


def split(mbits: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(exponent bits, mantissa bits) as float tensors: m clamped to 1..bits-2 and rounded, with a
    straight-through gradient."""
    m = mbits.float().clamp(1, bits - 2)
    m = m + (m.round() - m).detach()
    return (bits - 1) - m, m


def grid_max(e: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The largest value of the ExMy grid (bias 2^(e-1) - 1, top code unused): 448 for E4M3."""
    bias = torch.exp2(e - 1) - 1
    return (2 - torch.exp2(1 - m)) * torch.exp2(torch.exp2(e) - 1 - bias)


def fake_quantize_learned(x: torch.Tensor, clip: torch.Tensor, mbits: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x on the scaled ExMy grid whose largest value is `clip` (broadcasts against x: per tensor,
    channel or token), with e = bits - 1 - round(mbits); in x's dtype."""
    e, m = split(mbits, bits)
    bias = torch.exp2(e - 1) - 1
    c = clip.float()
    sigma = c / grid_max(e, m)
    xc = torch.maximum(torch.minimum(x.float(), c), -c)
    v = xc / sigma
    # each value's exponent floor(log2 |v|) = floor(log2 |x| - log2 sigma), differentiated through
    # -log2 sigma (the value is exactly the floor: the surrogate adds zero). A normal value's step
    # in absolute units, 2^(u - m) sigma, then depends on m alone, as in the paper: more mantissa
    # bits, a finer step. With the floor simply detached, the step would seem to follow sigma and the
    # bias, and the gradient of the error with respect to m pointed the wrong way (measured: positive
    # while the error falls). x keeps its straight-through gradient.
    lv = torch.log2(v.detach().abs().clamp_min(torch.finfo(torch.float32).tiny))
    ls = torch.log2(sigma)
    u = torch.floor(lv) - (ls - ls.detach())
    step = torch.exp2(torch.maximum(u, 1 - bias) - m)  # subnormals share the lowest binade's step
    q = v / step
    q = q + (q.round() - q).detach()
    return (q * step * sigma).to(x.dtype)


def format_name(mbits: float, bits: int = 8) -> str:
    """'E4M3' for mbits 3 (rounded as the forward rounds it)."""
    m = int(min(max(round(float(mbits)), 1), bits - 2))
    return f"E{bits - 1 - m}M{m}"

"""Scaled minifloat quantization (FP8 E4M3FN / E5M2 first, any `Minifloat`): exact, saturating.

Pure tensor functions, no modules. Values are mapped to the format's grid by `fmt.cast`: torch's
own cast for formats torch has and rounds identically (round-to-nearest-even, bit-exact with the
hardware formats, tested on every code) after an explicit clamp to +-max, else lowbit's simulator.
The clamp makes saturation a property of lowbit rather than of the installed torch (CPU builds of
torch 2.13 saturate, but older builds and some device kernels turn 500 into NaN for E4M3FN).
NaN inputs stay NaN; +-inf saturate to +-max like any out-of-range value.

Shapes: `x` is any shape; `scale` broadcasts against it, or (for groups) has a last dimension
`x.shape[-1] // group_size` and is expanded along the last dimension.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lowbit.formats.minifloat import E4M3FN, E5M2, Minifloat


class ScaledFormat(Protocol):
    """What the scaled functions below need of an element format: Minifloat, and IntFormat used
    symmetrically (zero point 0), both provide it."""

    @property
    def name(self) -> str: ...

    @property
    def max(self) -> float: ...

    def cast(self, x: torch.Tensor) -> torch.Tensor: ...

    def quantize_dequantize(self, x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor: ...


# FP8 is one case of the generic simulator: scales and (de)quantization below take any Minifloat
# (and any symmetric integer format: `lowbit.formats.integer.IntFormat`).
FloatFormat = Minifloat
E4M3 = E4M3FN

FORMATS: dict[str, Minifloat] = {"e4m3": E4M3, "float8_e4m3fn": E4M3, "e5m2": E5M2, "float8_e5m2": E5M2}

# Smallest scale lowbit ever writes: keeps all-zero channels and tokens finite (q = 0 there)
# and is a normal number in float32 and bfloat16 alike.
MIN_SCALE = 1e-12


def expand_scale(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-group scale (..., G) over x (..., G*g); other scales are returned as they are."""
    if scale.dim() == x.dim() and scale.shape[-1] not in (1, x.shape[-1]):
        groups = scale.shape[-1]
        if x.shape[-1] % groups:
            raise ValueError(f"{x.shape[-1]} values do not split into {groups} groups")
        return scale.repeat_interleave(x.shape[-1] // groups, dim=-1)
    return scale


def scale_from_amax(amax: torch.Tensor, fmt: ScaledFormat, scale_dtype: torch.dtype) -> torch.Tensor:
    """scale = amax / fmt.max, rounded to the dtype it will be stored in, returned as float32.

    Rounding first matters: readers dequantize with the stored scale, so lowbit quantizes with
    exactly that value (a scale rounded down may saturate the largest element by < 1 ulp of bf16).
    """
    scale = (amax.float() / fmt.max).clamp_min(MIN_SCALE)
    return scale.to(scale_dtype).float()


def quantize(x: torch.Tensor, scale: torch.Tensor, fmt: ScaledFormat = E4M3) -> torch.Tensor:
    """x / scale on fmt's grid, saturated: fmt.dtype codes, or float32 grid values for a format torch lacks."""
    return fmt.cast(x.float() / expand_scale(scale.float(), x))


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * scale, correctly rounded to `dtype`.

    When the scale is already stored in `dtype` (the usual case: bf16 model, bf16 scales) the codes
    are cast to `dtype` directly (exact: every FP8 value is a bf16/fp16/fp32 value) and multiplied
    there; the product of a 4-bit and an 8-bit significand is exact before its one rounding, so this
    equals the float32 product rounded to `dtype`, in two passes instead of four.
    """
    if scale.dtype == dtype and dtype in (torch.bfloat16, torch.float32):
        return q.to(dtype) * expand_scale(scale, q)
    return (q.float() * expand_scale(scale.float(), q)).to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, fmt: ScaledFormat = E4M3) -> torch.Tensor:
    """Quantize-dequantize in x's dtype: what a W8A8 kernel sees, for emulation.

    Equal to dequantize(quantize(x, scale), scale, x.dtype) (the product of a grid value and a
    scale is exact in float32 before its one rounding to x.dtype), computed by the simulator's
    chunked in-place path: about 2x faster than casting to float8 and back in separate passes.
    """
    s = scale.float()
    if s.dim() == x.dim() and s.dim() > 0 and s.shape[-1] not in (1, x.shape[-1]):  # (..., G) group scales
        groups = s.shape[-1]
        if x.shape[-1] % groups:
            raise ValueError(f"{x.shape[-1]} values do not split into {groups} groups")
        y = fmt.quantize_dequantize(x.unflatten(-1, (groups, x.shape[-1] // groups)), s.unsqueeze(-1))
        return y.flatten(-2)
    return fmt.quantize_dequantize(x, s)


def _fake_quantize_sync_free(x: torch.Tensor, scale: torch.Tensor, fmt: ScaledFormat) -> torch.Tensor | None:
    """`fake_quantize` in plain tensor ops, for training: no host round trip (no scale or NaN
    check), no chunk loop, nothing torch.compile cannot trace; None for a format it does not cover.

    Signed integer formats (round half to even, clamp to [qmin, qmax]) and minifloats whose torch
    dtype rounds as lowbit does (E4M3FN, E5M2 and their fnuz variants: clamp to +-max, cast). Same
    float32 division, rounding and product as `fake_quantize`, so the values are equal to its own
    (tested), except that a zero may keep its sign. Bad scales and NaN inputs are not refused here:
    they make the loss non-finite, which the training loop catches. On a GPU, a check per layer and
    step would make the host wait for the GPU before launching the next layer's kernels."""
    if hasattr(fmt, "qmin"):
        if not getattr(fmt, "signed", False):
            return None
    elif not (getattr(fmt, "torch_rounds", False) and getattr(fmt, "dtype", None) in _FP8_DTYPES):
        return None
    xf, s, grouped = _grouped(x, scale)
    v = torch.div(xf, s)
    if hasattr(fmt, "qmin"):
        q = v.round_().clamp_(fmt.qmin, fmt.qmax)  # type: ignore[attr-defined]
    else:
        q = v.clamp_(-fmt.max, fmt.max).to(fmt.dtype).float()  # type: ignore[attr-defined]
    y = q.mul_(s)
    return (y.flatten(-2) if grouped else y).to(x.dtype)


_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                    if hasattr(torch, n))


def _train_fake_quantize(x: torch.Tensor, scale: torch.Tensor, fmt: ScaledFormat) -> torch.Tensor:
    y = _fake_quantize_sync_free(x, scale, fmt)
    return fake_quantize(x, scale, fmt) if y is None else y


def _grouped(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """x float32 and the scale so that they broadcast: (..., G, g) and (..., G, 1) for group scales."""
    xf, s = x.float(), scale.float()
    if s.dim() == x.dim() and s.dim() > 0 and s.shape[-1] not in (1, x.shape[-1]):
        if x.shape[-1] % s.shape[-1]:
            raise ValueError(f"{x.shape[-1]} values do not split into {s.shape[-1]} groups")
        return xf.unflatten(-1, (s.shape[-1], -1)), s.unsqueeze(-1), True
    return xf, s, False


# The two functions below give `fake_quantize`'s values and the gradients of their docstrings
# without a custom autograd.Function: the exact values y, plus a surrogate whose gradients are the
# wanted ones, added as (surrogate - surrogate.detach()), which is exactly zero. Traceable by
# torch.compile as plain tensor ops (a custom Function compiled for CUDA by torch 2.11 returned zero
# weight gradients: measured on the H100, while the same code compiled for the CPU was right).


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, fmt: ScaledFormat = E4M3) -> torch.Tensor:
    """fake_quantize with a straight-through gradient for x: identity inside [-max*scale, max*scale],
    zero outside (scale is treated as a constant)."""
    with torch.no_grad():
        y = _train_fake_quantize(x, scale, fmt)
    xf, s, grouped = _grouped(x, scale.detach())
    inside = xf.detach().abs() <= fmt.max * s
    sur = torch.where(inside, xf, 0.0)
    sur = sur.flatten(-2) if grouped else sur
    return y + (sur - sur.detach()).to(y.dtype)


def fake_quantize_lsq(x: torch.Tensor, scale: torch.Tensor, fmt: ScaledFormat = E4M3,
                      grad_scale: float = 1.0) -> torch.Tensor:
    """y = s * Q(x / s), Q rounding to fmt's grid and saturating at +-fmt.max, with the gradients of
    LSQ (Esser et al. 2020) for a learned scale:

    dy/dx = 1 inside the range, 0 outside (straight-through);
    dy/ds = Q(x/s) - x/s inside, +-fmt.max outside, times `grad_scale` (LSQ uses 1 / sqrt(N * max)
    for N values per scale, so that scales and weights learn at comparable rates).
    The values are exactly `fake_quantize`'s: what the checkpoint's reader computes.
    """
    with torch.no_grad():
        y = _train_fake_quantize(x, scale, fmt)
    xf, s, grouped = _grouped(x, scale)
    yf = y.float().unflatten(-1, xf.shape[-2:]) if grouped else y.float()
    sd = s.detach()
    v = xf.detach() / sd
    inside = v.abs() <= fmt.max
    c = torch.where(inside, yf / sd - v, torch.sign(v) * fmt.max)  # the grid value x went to, minus x/s
    sur = torch.where(inside, xf, 0.0) + s * (c * grad_scale)
    sur = sur.flatten(-2) if grouped else sur
    return y + (sur - sur.detach()).to(y.dtype)


def mse_scale(
    x: torch.Tensor,
    amax: torch.Tensor,
    fmt: ScaledFormat,
    scale_dtype: torch.dtype,
    *,
    shrink: tuple[float, float, int] = (0.8, 1.0, 21),
) -> torch.Tensor:
    """The scale, among amax * [lo..hi] / fmt.max, that minimizes the quantization MSE of x.

    amax has x's reduction shape (keepdim), so the search runs independently per tensor, per
    channel or per expert. Shrinking below amax clips the largest values to trade their error for
    a finer grid elsewhere: for a minifloat the grid's relative step is fixed within a binade, so
    what moves is where each value falls inside its binade and how the top binade (448 = 1.75 *
    256 for E4M3) is used. Returns float32, already rounded to `scale_dtype`.
    """
    lo, hi, n = shrink
    xf = x.float()
    reduce = tuple(d for d in range(x.dim()) if amax.shape[d] == 1 and x.shape[d] != 1) or None
    best_err: torch.Tensor | None = None
    best = scale_from_amax(amax, fmt, scale_dtype)
    for a in torch.linspace(hi, lo, n).tolist():  # amax itself first: ties keep the min-max scale
        s = scale_from_amax(amax * a, fmt, scale_dtype)
        err = (fake_quantize(xf, s, fmt) - xf).square()
        err = err.sum(dim=reduce, keepdim=True) if reduce else err
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best

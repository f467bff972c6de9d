"""One Triton kernel for the minifloat simulator on CUDA: divide by the scale, round to the
grid, multiply back, in one read and one write (the eager path needs about ten kernels).

It is the same arithmetic as `Minifloat._round_chunk` (integer round-to-nearest-even on the
float32 bits for normals, add/subtract of a power of two for subnormals, IEEE division and
multiplication), so its results equal the CPU's bit for bit (tested on the GPU). Divisions use div_rn: Triton's
`/` on float32 is approximate. A scale that is not positive and finite makes NaN (the CPU path
raises instead; raising here would cost a host round trip per call).
Imported only when a CUDA tensor is rounded; without Triton the eager path runs instead.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from lowbit.formats.minifloat import Minifloat

_BLOCK = 1024


@triton.jit
def _round_kernel(
    x_ptr,
    s_ptr,
    out_ptr,
    n,
    row_len,
    vmax,
    min_normal,
    magic,
    overflow,
    shift,
    half,
    keep,
    flip,
    ROUND: tl.constexpr,  # False for 23 mantissa bits: float32 itself, nothing to round
    SCALE_MODE: tl.constexpr,  # 0: none, 1: one scale, 2: one per row of row_len elements
    SATURATE: tl.constexpr,
    SUBNORMALS: tl.constexpr,
    SIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    if SCALE_MODE == 1:
        s = tl.load(s_ptr)
        a = tl.abs(tl.math.div_rn(x, s))  # correctly rounded: Triton's `/` is approximate
    elif SCALE_MODE == 2:
        s = tl.load(s_ptr + offs // row_len, mask=inside, other=1.0)
        a = tl.abs(tl.math.div_rn(x, s))
    else:
        a = tl.abs(x)
    if SATURATE:
        a = tl.where(a > vmax, vmax, a)  # NaN > vmax is false: NaN stays NaN
    if ROUND:
        b = a.to(tl.int32, bitcast=True)
        lsb = ((b >> shift) & 1) ^ flip
        normal = ((b + lsb + half) & keep).to(tl.float32, bitcast=True)
    else:
        normal = a
    if SUBNORMALS:
        r = tl.where(a >= min_normal, normal, (a + magic) - magic)
    else:
        r = tl.where(a >= min_normal, normal, tl.where(a != a, a, min_normal))
    if not SATURATE:
        r = tl.where(r > vmax, overflow, r)
    if SIGNED:
        sign = x.to(tl.int32, bitcast=True) & -2147483648
        r = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    if SCALE_MODE != 0:
        # a zero, negative, inf or NaN scale gives NaN: visible, never a silently wrong number
        # (the CPU path raises; checking here avoids a host round trip per call)
        r = tl.where((s > 0) & (s < float("inf")), r * s, float("nan"))
    tl.store(out_ptr + offs, r, mask=inside)


@functools.cache
def _format_args(fmt: Minifloat) -> tuple[float | int, ...]:
    """The kernel's per-format numbers, computed once (fmt.max goes through Fraction arithmetic)."""
    s = 23 - fmt.mbits
    return (
        fmt.max,
        fmt.min_normal,
        2.0 ** (fmt.emin - fmt.mbits + 23),
        math.inf if fmt.convention == "ieee" else math.nan,
        s,
        (1 << (s - 1)) - 1 if s else 0,
        ~((1 << s) - 1),
        int(fmt._flip_parity),
    )


def round_cuda(fmt: Minifloat, x: torch.Tensor, scale: torch.Tensor | None, saturate: bool) -> torch.Tensor:
    """x: contiguous float32 CUDA tensor; scale: None, a 0-dim tensor, or one per row (N, 1) of x viewed
    as (N, x.shape[-1]). Returns a new float32 tensor of x's shape."""
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    if scale is None:
        mode, s_arg, row_len = 0, x, 1
    elif scale.numel() == 1:
        mode, s_arg, row_len = 1, scale.float().reshape(1), 1
    else:
        mode, s_arg, row_len = 2, scale.float().contiguous(), x.shape[-1]
    grid = (triton.cdiv(n, _BLOCK),)
    _round_kernel[grid](
        x,
        s_arg,
        out,
        n,
        row_len,
        *_format_args(fmt),
        ROUND=fmt.mbits < 23,
        SCALE_MODE=mode,
        SATURATE=saturate,
        SUBNORMALS=fmt.subnormals,
        SIGNED=fmt.signed,
        BLOCK=_BLOCK,
    )
    return out

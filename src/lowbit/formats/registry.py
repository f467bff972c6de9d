"""Every named format, by name: lookup, the `lowbit formats` table, explanations and grids for plots.

Names are case-insensitive. Besides the named formats (and their aliases) any minifloat can be
written `eXmY` with an optional convention suffix and bias: `e3m3` (IEEE convention),
`e3m3fn`, `e4m3fnuz`, `e3m2finite`, `e5m2_b13` (bias 13), `e4m3_b8` (E4M3FN's convention: without
a suffix, widths that have a named format take its convention; others are IEEE). Written names are limited to 16 bits
(wider floats exist only as the named bf16 / fp16 / tf32); the Python class `Minifloat` takes any
E1..E8 x M0..M23 that float32 holds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.formats.block import BLOCK_FORMATS, BlockFormat
from lowbit.formats.explain import explain_minifloat
from lowbit.formats.integer import INT_FORMATS, IntFormat
from lowbit.formats.minifloat import MINIFLOATS, Minifloat
from lowbit.formats.nf4 import NF4_LEVELS


@dataclass(frozen=True)
class NF4Format:
    """QLoRA's 4-bit NormalFloat: 16 fixed levels in [-1, 1] times a float32 absmax per block."""

    name: str = "nf4"
    block_size: int = 64
    bits: int = 4


NF4 = NF4Format()

Format = Minifloat | IntFormat | NF4Format | BlockFormat

ALIASES: dict[str, str] = {
    "e4m3": "e4m3fn",
    "fp8": "e4m3fn",
    "fp8_e4m3": "e4m3fn",
    "float8_e4m3fn": "e4m3fn",
    "fp8_e5m2": "e5m2",
    "float8_e5m2": "e5m2",
    "float8_e4m3fnuz": "e4m3fnuz",
    "float8_e5m2fnuz": "e5m2fnuz",
    "fp4": "e2m1",
    "fp4_e2m1": "e2m1",
    "float4_e2m1": "e2m1",
    "fp6_e2m3": "e2m3",
    "fp6_e3m2": "e3m2",
    "e8m0fnu": "e8m0",
    "float8_e8m0fnu": "e8m0",
    "half": "fp16",
    "float16": "fp16",
    "bfloat16": "bf16",
}

_EXMY = re.compile(r"^e(\d+)m(\d+)(fnuz|fn|finite)?(?:_b(-?\d+))?$")
MAX_WRITTEN_BITS = 16


def named_formats() -> dict[str, Format]:
    """Every named format in table order: minifloats, integers, NF4, block formats."""
    out: dict[str, Format] = dict(MINIFLOATS)
    out.update(INT_FORMATS)
    out["nf4"] = NF4
    for f in BLOCK_FORMATS.values():
        out.setdefault(f.name, f)
    return out


def get_format(name: str) -> Format:
    """The format called `name` (a named format, an alias, or eXmY[fn|fnuz|finite][_bBIAS])."""
    key = name.strip().lower()
    if not _EXMY.match(key):  # "fp8-e4m3" -> "fp8_e4m3"; a negative bias ("_b-2") keeps its minus
        key = key.replace("-", "_")
    key = ALIASES.get(key, key)
    named = named_formats()
    if key in named:
        return named[key]
    if key in BLOCK_FORMATS:
        return BLOCK_FORMATS[key]
    m = _EXMY.match(key)
    if m:
        e, mb = int(m.group(1)), int(m.group(2))
        if e == 0:
            raise ValueError(f"{name}: a float needs at least one exponent bit (E0 is an integer format: use int)")
        if 1 + e + mb > MAX_WRITTEN_BITS:
            raise ValueError(
                f"{name}: {1 + e + mb} bits; formats named eXmY have at most {MAX_WRITTEN_BITS} bits "
                "(1 sign + X + Y); wider floats: bf16, fp16, tf32"
            )
        # no suffix: the convention of the named format of these widths (e4m3 -> FN, e2m1 -> finite),
        # so "e4m3_b8" is E4M3FN with bias 8; widths without a named format default to IEEE
        same_widths = [f for f in MINIFLOATS.values() if (f.ebits, f.mbits, f.signed) == (e, mb, True)]
        conv = m.group(3) or (same_widths[0].convention if same_widths else "ieee")
        bias = int(m.group(4)) if m.group(4) is not None else None
        return Minifloat(e, mb, bias=bias, convention=conv)  # type: ignore[arg-type]
    m = re.match(r"^(u?)int(\d+)$", key)
    if m:
        return IntFormat(key, int(m.group(2)), signed=not m.group(1))
    known = ", ".join(named) + "; or eXmY[fn|fnuz|finite][_bBIAS], intN, uintN"
    raise ValueError(f"unknown format {name!r}; known: {known}")


# --- the table ---------------------------------------------------------------------------------------------------
def describe(fmt: Format) -> dict[str, Any]:
    """One row of `lowbit formats`: every field as a plain number or string (also written as JSON)."""
    if isinstance(fmt, Minifloat):
        return {
            "name": fmt.name,
            "kind": "float",
            "bits": fmt.bits,
            "ebits": fmt.ebits,
            "mbits": fmt.mbits,
            "bias": fmt.exponent_bias,
            "specials": {"ieee": "inf, NaN" if fmt.has_nan else "inf", "fn": "NaN", "fnuz": "NaN (-0)", "finite": "-"}[
                fmt.convention
            ],
            "max": fmt.max,
            "min_normal": fmt.min_normal,
            "min_subnormal": fmt.min_subnormal if fmt.subnormals and fmt.mbits else None,
            "finite_values": fmt.num_finite,
            "relative_step": fmt.relative_step,
            "bits_per_value": float(fmt.bits),
        }
    if isinstance(fmt, IntFormat):
        return {
            "name": fmt.name,
            "kind": "integer",
            "bits": fmt.bits,
            "ebits": None,
            "mbits": None,
            "bias": None,
            "specials": "-",
            "max": float(fmt.qmax),
            "min_normal": None,
            "min_subnormal": None,
            "finite_values": fmt.qmax - fmt.qmin + 1,
            "relative_step": 1.0 / fmt.qmax,  # a step relative to the largest value (the scale's unit)
            "bits_per_value": float(fmt.bits),
        }
    if isinstance(fmt, NF4Format):
        gaps = NF4_LEVELS.diff()
        return {
            "name": fmt.name,
            "kind": f"lookup, block {fmt.block_size}",
            "bits": 4,
            "ebits": None,
            "mbits": None,
            "bias": None,
            "specials": "-",
            "max": 1.0,
            "min_normal": float(NF4_LEVELS[NF4_LEVELS > 0].min()),
            "min_subnormal": None,
            "finite_values": 16,
            "relative_step": float(gaps.max()),
            "bits_per_value": 4 + 32 / fmt.block_size,  # a float32 absmax per block
        }
    el = describe(fmt.element)
    overhead = fmt.scale_format.bits / fmt.block_size
    return {
        **el,
        "name": fmt.name,
        "kind": f"block {fmt.block_size}, {fmt.scale_format.name} scale" + (" + fp32 tensor scale" if fmt.two_level else ""),
        "bits_per_value": el["bits"] + overhead,
    }


def table_rows() -> list[dict[str, Any]]:
    return [describe(f) for f in named_formats().values()]


# --- explanations ------------------------------------------------------------------------------------------------
def explain(fmt: Format) -> str:
    if isinstance(fmt, Minifloat):
        return explain_minifloat(fmt)
    if isinstance(fmt, IntFormat):
        kind = "two's complement" if fmt.signed else "unsigned binary"
        lines = [
            f"{fmt.name.upper()}: a {fmt.bits}-bit {kind} integer, codes {fmt.qmin} .. {fmt.qmax}",
            "  value      (q - zero_point) x scale; symmetric: zero_point = 0, scale = absmax / qmax",
            f"             (so {fmt.qmax} stands for absmax and {fmt.qmin} is reached only beyond it)"
            if fmt.signed
            else "             (unsigned codes need a zero point: asymmetric only)",
            "  asymmetric scale = (max - min) / (qmax - qmin), zero_point = round(qmin - min / scale),",
            "             with the range widened to contain 0 so that 0 is exact",
            f"  precision  a uniform grid: every step is scale, 1/{fmt.qmax} of absmax = {1 / fmt.qmax:.3%},",
            "             fine for the largest values, coarse for small ones (a float's step shrinks with the value)",
            "  specials   none: NaN is refused, +-inf saturate to the end codes",
        ]
        return "\n".join(lines)
    if isinstance(fmt, NF4Format):
        levels = ", ".join(f"{v:.4f}" for v in NF4_LEVELS.tolist())
        return "\n".join(
            [
                f"NF4: QLoRA's 4-bit NormalFloat, blocks of {fmt.block_size} values sharing a float32 absmax",
                "  value      level[code] x absmax of the block; 16 levels in [-1, 1]:",
                f"             {levels}",
                "  why        the levels are quantiles of a standard normal, so each of the 16 codes is used about",
                "             equally often by normally distributed weights; 8 levels above 0 and 7 below keep 0 exact",
                f"  cost       4 bits + 32/{fmt.block_size} for the absmax = {4 + 32 / fmt.block_size:.2f} bits per value",
            ]
        )
    el = fmt.element
    head = [
        f"{fmt.name.upper()}: blocks of {fmt.block_size} {el.name.upper()} values along the last dimension, "
        f"one {fmt.scale_format.name.upper()} scale per block"
        + (", and one float32 scale per tensor" if fmt.two_level else ""),
    ]
    if fmt.scale_format.mbits == 0:
        emax = el.max_pair[1]
        head += [
            f"  scale      X = 2^(floor(log2(absmax of the block)) - {emax}), a power of two (OCP MX v1.0):",
            f"             {emax} is the exponent of {el.name.upper()}'s largest normal, so the block's largest value lands in",
            f"             [2^{emax}, 2^{emax + 1}) and saturates at {el.max:g} when above it",
        ]
    else:
        head += [
            f"  scales     global g = absmax(tensor) / ({fmt.scale_format.max:g} x {el.max:g}); block s = absmax(block) / {el.max:g} / g,",
            f"             rounded to {fmt.scale_format.name.upper()} (3 mantissa bits: finer than MX's powers of two)",
        ]
    head.append(
        f"  cost       {el.bits} + {fmt.scale_format.bits}/{fmt.block_size} = {el.bits + fmt.scale_format.bits / fmt.block_size:.3g} bits per value"
    )
    head.append("")
    head.append("The element format:")
    return "\n".join(head) + "\n" + explain_minifloat(el)


# --- grids for plots ---------------------------------------------------------------------------------------------
def positive_grid(fmt: Format) -> torch.Tensor:
    """The positive representable values of the element grid (before any scale), ascending, float64."""
    if isinstance(fmt, BlockFormat):
        fmt = fmt.element
    if isinstance(fmt, Minifloat):
        v = fmt.values().double()
    elif isinstance(fmt, IntFormat):
        v = torch.arange(1, fmt.qmax + 1, dtype=torch.float64)
    else:
        v = NF4_LEVELS.double()
    return v[v > 0]


def relative_error_curve(fmt: Format, x: torch.Tensor) -> torch.Tensor:
    """|round(x) - x| / x for positive x on the element grid, saturating at its largest value."""
    if isinstance(fmt, BlockFormat):
        fmt = fmt.element
    if isinstance(fmt, Minifloat):
        r = fmt.round(x.float()).double()
    else:
        grid = torch.cat([torch.zeros(1, dtype=torch.float64), positive_grid(fmt)])
        xc = x.double().clamp(max=float(grid[-1]))
        i = torch.searchsorted(grid, xc).clamp(1, grid.numel() - 1)
        lo, hi = grid[i - 1], grid[i]
        r = torch.where(xc - lo <= hi - xc, lo, hi)
    return ((r - x.double()).abs() / x.double()).clamp(max=1.0)


def span(fmt: Format) -> tuple[float, float]:
    g = positive_grid(fmt)
    return float(g[0]), float(g[-1])


def log2_span(fmt: Format) -> float:
    lo, hi = span(fmt)
    return math.log2(hi / lo)

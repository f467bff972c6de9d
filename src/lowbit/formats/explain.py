"""Worked derivations of where a format's range comes from, for any ExMy (text for `lowbit formats explain`).

Every number printed is computed from the format's fields (and checked against the simulator's
decode of the very code it names), so the text is right for any exponent/mantissa width, bias
and convention, not only for the named formats.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from lowbit.formats.minifloat import Minifloat


def _bin_sig(sig: Fraction, mbits: int) -> str:
    """1.M in binary, e.g. Fraction(7, 4) with 3 bits -> '1.110'."""
    frac = int((sig - 1) * 2**mbits)
    return "1" if mbits == 0 else f"1.{frac:0{mbits}b}"


def _num(v: float) -> str:
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.6g}"


def _pattern(fmt: Minifloat, field: int, mant: int, sign: int = 0) -> str:
    parts = [str(sign)] if fmt.signed else []
    parts.append(f"{field:0{fmt.ebits}b}")
    if fmt.mbits:
        parts.append(f"{mant:0{fmt.mbits}b}")
    return ".".join(parts)


def _code(fmt: Minifloat, field: int, mant: int) -> int:
    return field << fmt.mbits | mant


def explain_minifloat(fmt: Minifloat) -> str:
    e, m, b = fmt.ebits, fmt.mbits, fmt.exponent_bias
    top = 2**e - 1
    article = "an" if str(fmt.bits).startswith(("8", "11", "18")) else "a"
    lines = [f"{fmt.name.upper()}: {article} {fmt.bits}-bit float"]
    layout = (["1 sign bit"] if fmt.signed else ["no sign bit (unsigned)"]) + [
        f"{e} exponent bit{'s' * (e != 1)}",
        f"{m} mantissa bit{'s' * (m != 1)}",
    ]
    lines.append(
        "  layout     "
        + " + ".join(layout)
        + f"  (bit pattern written {_pattern(fmt, 0, 0).replace('0', 'x')})"
    )
    conv = {
        "ieee": f"IEEE: the all-ones exponent field ({top}) holds infinities (mantissa 0) and NaN (any other mantissa)"
        if m
        else f"IEEE: the all-ones exponent field ({top}) holds the infinities (no mantissa bits: no NaN)",
        "fn": f"FN: no infinities; only the all-ones pattern {_pattern(fmt, top, 2**m - 1)}"
        + (" (with either sign) is NaN" if fmt.signed else " is NaN"),
        "fnuz": "FNUZ: no infinities, no negative zero; the pattern of -0 is the one NaN",
        "finite": "no infinities and no NaN: every pattern is a number",
    }[fmt.convention]
    lines.append(f"  specials   {conv}")
    default_bias = 2 ** (e - 1) - (0 if fmt.convention == "fnuz" else 1)
    how = f"2^({e}-1){'' if fmt.convention == 'fnuz' else ' - 1'} = {default_bias}"
    lines.append(
        f"  bias       {b}"
        + (
            f"  (the default {how})"
            if b == default_bias
            else f"  (set explicitly; the default would be {how})"
        )
    )
    if fmt.subnormals:
        lines.append(
            f"  normal     value = (-1)^S x 1.M (binary) x 2^(E - {b}), for exponent fields E = 1 .. {fmt.top_field}"
        )
        lines.append(f"  subnormal  E = 0: value = (-1)^S x 0.M (binary) x 2^(1 - {b}) (zero when M = 0)")
    else:
        last = fmt.top_field - 1 if fmt.convention == "fn" and m == 0 else fmt.top_field
        nan_note = f" ({fmt.top_field} is NaN)" if last != fmt.top_field else ""
        lines.append(
            f"  value      1.M (binary) x 2^(E - {b}) for every exponent field E = 0 .. {last}{nan_note}; no zero, no subnormals"
        )

    # --- the largest value, step by step ---
    lines.append("")
    lines.append("Largest finite value")
    sig, emax = fmt.max_pair
    if fmt.convention == "ieee":
        lines.append(
            f"  1. The top exponent field {top:0{e}b} ({top}) is reserved for inf/NaN, so the largest finite field is {top - 1}."
        )
    elif fmt.convention == "fn" and m == 0:
        lines.append(
            f"  1. The top exponent field {top:0{e}b} ({top}) has no mantissa bits, so it is only the NaN code;"
        )
        lines.append(f"     the largest finite field is {top - 1}.")
    else:
        lines.append(f"  1. The top exponent field {top:0{e}b} ({top}) holds numbers in this convention.")
    field = emax + b
    lines.append(f"  2. That field means 2^({field} - {b}) = 2^{emax} = {_num(2.0**emax)}.")
    full = 1 + Fraction(2**m - 1, 2**m)
    if m == 0:
        lines.append("  3. With no mantissa bits the significand is the implicit 1.")
    elif fmt.convention == "fn":
        lines.append(
            f"  3. Its largest mantissa, {_bin_sig(full, m)} (binary) = {float(full):g}, would give "
            f"{_num(float(full * Fraction(2) ** emax))}, but {_pattern(fmt, top, 2**m - 1)} is the NaN code;"
        )
        lines.append(
            f"     the largest finite mantissa is one step lower: {_bin_sig(sig, m)} (binary) = {float(sig):g}."
        )
    else:
        lines.append(f"  3. Its largest mantissa is all ones: {_bin_sig(sig, m)} (binary) = {float(sig):g}.")
    lines.append(
        f"  4. Largest value: {float(sig):g} x 2^{emax} = {_num(fmt.max)}"
        f"   (pattern {_pattern(fmt, field, int((sig - 1) * 2**m))})."
    )
    if e >= 2 and fmt.convention in ("ieee", "fn") and fmt.signed:
        other = "fn" if fmt.convention == "ieee" else "ieee"
        try:
            alt = Minifloat(e, m, bias=b, convention=other)  # type: ignore[arg-type]
            lines.append(
                f"     (Under the {other.upper()} convention the same bits would reach {_num(alt.max)}.)"
            )
        except ValueError:
            pass
    check = float(fmt.decode(torch.tensor([_code(fmt, field, int((sig - 1) * 2**m))]))[0])
    assert check == fmt.max, f"derivation of {fmt.name} disagrees with its decoder: {check} != {fmt.max}"

    lines.append("")
    lines.append("Smallest values")
    first = 1 if fmt.subnormals else 0
    lines.append(
        f"  smallest normal     field {first}: {_bin_sig(Fraction(1), m)} x 2^({first} - {b}) = 2^{fmt.emin} = {_num(fmt.min_normal)}"
    )
    if fmt.subnormals and m:
        lines.append(
            f"  smallest subnormal  0.{'0' * (m - 1)}1 x 2^{fmt.emin} = 2^{fmt.emin - m} = {_num(fmt.min_subnormal)}"
            f"   (gradual underflow: {2**m - 1} subnormals below the normals)"
        )
    elif fmt.subnormals:
        lines.append("  no subnormals besides zero: with no mantissa bits field 0 is only +-0")
    lines.append("")
    lines.append("Precision")
    lines.append(
        f"  {m} mantissa bit{'s' * (m != 1)}: {2**m} step{'s' * (m != 0)} per binade, relative step 2^-{m} = {fmt.relative_step:.4g}"
    )
    h = fmt.relative_step / 2
    lines.append(
        f"  rounding to nearest errs by at most half a step; relative to the value that is at most"
        f" 2^-{m + 1} / (1 + 2^-{m + 1}) = {h / (1 + h):.2%} (at the first midpoint of a binade, normal range)"
    )
    lines.append(
        f"  {fmt.num_finite if fmt.bits <= 20 else 'about ' + _num(2.0**fmt.bits)} distinct finite values;"
        f" dynamic range max / smallest = 2^{fmt.dynamic_range_binades:.1f}"
    )
    return "\n".join(lines)

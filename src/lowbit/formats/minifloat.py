"""Generic ExMy minifloats, simulated exactly in float32.

A `Minifloat` is any binary floating-point format with 1..8 exponent bits and 0..23 mantissa bits
(sign optional), a configurable exponent bias and one of four conventions for the top codes:

- ``ieee``: the all-ones exponent field holds +-inf (mantissa 0) and NaN (anything else), as FP16,
  BF16 and E5M2;
- ``fn`` ("finite, NaN"): no infinities; only the all-ones code (exponent and mantissa) is NaN, so
  the top binade is usable except its last step, as OCP E4M3FN (max 1.75 * 2^8 = 448) and E8M0;
- ``fnuz`` ("finite, NaN, unsigned zero"): no infinities, no negative zero; the code of -0 is the
  one NaN, as the float8 *_fnuz dtypes of AMD MI300 (default bias one higher);
- ``finite``: every code is a finite number, no NaN, no inf (the OCP MX elements E2M1, E2M3, E3M2).

Every value of every such format is a float32 value (E8 bias <= 127 + 22 keeps the smallest
subnormal >= 2^-149), so the simulator rounds float32 to the format's grid and returns float32:

- round-to-nearest, ties to the even *code* (IEEE 754 roundTiesToEven; for M0 formats that is the
  even exponent), with subnormals (gradual underflow) unless the format has none (E8M0, whose
  exponent field 0 is the normal binade 2^-127);
- saturation by default: anything beyond +-max, +-inf included, becomes +-max. With
  ``saturate=False`` an overflow follows the format: inf for ``ieee``, NaN for ``fn``/``fnuz``
  (there is no overflow without saturation in ``finite`` formats, which always saturate);
- NaN inputs give NaN (in float32) for every format; ``encode`` maps them to the format's NaN code
  and refuses them for ``finite`` formats, which have none.

How: normal values round with an integer trick on the float32 bits (add half an ulp of the target
format minus one plus the lowest kept bit, then clear the dropped bits: ties go to even and a
carry moves into the exponent); values in the format's subnormal range round by adding and
subtracting 2^(emin - m + 23), whose float32 ulp is the subnormal step. Both are exact float32
operations. The work is done in cache-sized chunks in place, which makes a quantize-dequantize of
a 4096 x 4096 float32 tensor cost about one cast to float8 and back on a CPU (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import torch

Convention = Literal["ieee", "fn", "fnuz", "finite"]
CONVENTIONS: tuple[str, ...] = ("ieee", "fn", "fnuz", "finite")

_F32_MIN_NORMAL = 2.0**-126
_CHUNK = 1 << 18  # elements per in-place pass on CPU: 1 MiB of float32, stays in L2


@dataclass(frozen=True)
class Minifloat:
    """A sign (optional) + `ebits` exponent + `mbits` mantissa binary floating-point format.

    bias defaults to 2^(ebits-1) - 1 (2^(ebits-1) for ``fnuz``). `torch_dtype` names the torch
    dtype with the same bit layout, when there is one (codes are stored in it); `torch_rounds` says
    that torch's cast to it rounds exactly as this simulator does (tested), so `cast` may use it.
    """

    ebits: int
    mbits: int
    bias: int | None = None
    convention: Convention = "ieee"
    signed: bool = True
    subnormals: bool = True
    name: str = ""
    torch_dtype: str | None = None
    torch_rounds: bool = False
    _bias: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        if not 1 <= self.ebits <= 8:
            raise ValueError(
                f"E{self.ebits}M{self.mbits}: exponent bits must be 1..8 (float32 holds the result)"
            )
        if not 0 <= self.mbits <= 23:
            raise ValueError(
                f"E{self.ebits}M{self.mbits}: mantissa bits must be 0..23 (float32 holds the result)"
            )
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown convention {self.convention!r}; known: {', '.join(CONVENTIONS)}")
        if self.convention == "fnuz" and not self.signed:
            raise ValueError("fnuz puts NaN on the code of -0: it needs a sign bit")
        bias = self.bias
        if bias is None:
            bias = 2 ** (self.ebits - 1) - (0 if self.convention == "fnuz" else 1)
        object.__setattr__(self, "_bias", bias)
        if not self.name:
            suffix = {"ieee": "", "fn": "fn", "fnuz": "fnuz", "finite": "finite"}[self.convention]
            default = 2 ** (self.ebits - 1) - (0 if self.convention == "fnuz" else 1)
            tail = "" if bias == default else f"_b{bias}"
            object.__setattr__(self, "name", f"e{self.ebits}m{self.mbits}{suffix}{tail}")
        if self.bits < 2:
            raise ValueError(f"{self.name}: a format needs at least 2 bits")
        if self.ieee_top_reserved and self.ebits == 1:
            raise ValueError(
                f"{self.name}: with one exponent bit the IEEE convention leaves no finite normal binade"
            )
        if self.max_pair[1] < self.emin:
            raise ValueError(f"{self.name}: no finite value besides zero (the top code is NaN)")
        if self.max_pair[1] > 127 or self.emin - self.mbits < -149:
            raise ValueError(
                f"{self.name} with bias {bias}: its range does not fit in float32 (2^-149 .. 2^127)"
            )

    # --- fields and range -------------------------------------------------------------------------------------
    @property
    def exponent_bias(self) -> int:
        return self._bias

    @property
    def bits(self) -> int:
        return int(self.signed) + self.ebits + self.mbits

    @property
    def ieee_top_reserved(self) -> bool:
        return self.convention == "ieee"

    @property
    def top_field(self) -> int:
        """The largest exponent field that holds finite values."""
        return 2**self.ebits - (2 if self.ieee_top_reserved else 1)

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (field 1, or field 0 for formats without subnormals)."""
        return (1 if self.subnormals else 0) - self._bias

    @property
    def emax(self) -> int:
        return self.top_field - self._bias

    @property
    def max_pair(self) -> tuple[Fraction, int]:
        """(significand, exponent) of the largest finite value.

        The top finite binade is full, except in ``fn`` formats where its all-ones code is NaN: one
        step less, or (M0, a binade of one code) the whole binade less.
        """
        steps = 2**self.mbits - 1
        if self.convention == "fn":
            if self.mbits == 0:
                return Fraction(1), self.emax - 1
            steps -= 1
        return 1 + Fraction(steps, 2**self.mbits), self.emax

    @property
    def max(self) -> float:
        sig, e = self.max_pair
        return float(sig * Fraction(2) ** e)

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (the smallest normal when the format has no subnormals, or M0)."""
        return 2.0 ** (self.emin - self.mbits) if self.subnormals and self.mbits else self.min_normal

    @property
    def _flip_parity(self) -> bool:
        """M0 formats: the lowest kept float32 bit is the exponent's, whose parity is the code's only
        when bias and float32's 127 have the same parity; the tie-to-even rule flips otherwise."""
        return self.mbits == 0 and (self._bias - 127) % 2 == 1

    @property
    def has_zero(self) -> bool:
        return self.subnormals

    @property
    def has_inf(self) -> bool:
        return self.convention == "ieee"

    @property
    def has_nan(self) -> bool:
        # an IEEE M0 format has only inf in its top field
        return self.convention != "finite" and not (self.convention == "ieee" and self.mbits == 0)

    @property
    def relative_step(self) -> float:
        """Spacing of the grid relative to the start of a binade: 2^-m (half of it bounds the rounding error)."""
        return 2.0**-self.mbits

    @property
    def dynamic_range_binades(self) -> float:
        return math.log2(self.max / self.min_subnormal)

    @property
    def dtype(self) -> torch.dtype | None:
        """The torch dtype of one element with this layout (None for packed ones such as float4_e2m1fn_x2)."""
        if not self.torch_dtype or self.torch_dtype.endswith("_x2"):
            return None
        return getattr(torch, self.torch_dtype, None)

    def __str__(self) -> str:
        return self.name

    # --- simulation ------------------------------------------------------------------------------------------
    def round(
        self, x: torch.Tensor, *, saturate: bool = True, scale: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (or x / scale) rounded to this format's grid, as float32 of x's shape (times scale if given).

        Ties to even, subnormals, saturation; x of any float dtype and device. NaN stays NaN; see
        the module docstring for inf and overflow. `scale` (a positive number, or a tensor that
        broadcasts against x) is applied inside the chunked passes: a quantize-dequantize without
        extra passes over memory. Scales of shape (..., 1) (per row: channel, token, or group after
        an unflatten) keep the fast path; other shapes divide and multiply in separate passes.
        """
        xf = x.float().contiguous()
        if not self.signed:
            _refuse_negative(self, xf)
        if self.convention == "finite":
            saturate = True
        on_gpu = xf.device.type == "cuda" and _USE_KERNEL and self.emin >= -126
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            if on_gpu and scale.device == xf.device:  # keep it there: float() would wait for the GPU
                y = self._round_gpu(xf, scale.float().reshape(()), saturate)
                if y is not None:
                    return y
            scale = float(scale)
        if isinstance(scale, float | int):
            scale = float(scale)
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"scales must be positive and finite, got {scale}")
        if isinstance(scale, torch.Tensor):
            sf = scale.float()
            # on CUDA the kernel turns a bad scale into NaN instead (no host round trip per call)
            if not (on_gpu and sf.is_cuda):
                check_scales(sf)
            rowwise = xf.dim() >= 1 and sf.dim() <= xf.dim() and sf.shape[-1:] in ((1,), torch.Size([]))
            if not rowwise:  # e.g. one scale per column: divide and multiply outside the fast path
                return self.round(xf / sf, saturate=saturate).mul_(sf)
            rows = sf.expand(*xf.shape[:-1], 1).reshape(-1, 1).to(xf.device)
        if on_gpu:
            s_t = (
                rows
                if isinstance(scale, torch.Tensor)
                else None
                if scale is None
                else torch.tensor(scale, dtype=torch.float32, device=xf.device)
            )
            y = self._round_gpu(xf, s_t, saturate)
            if y is not None:
                return y
        out = torch.empty_like(xf)
        if isinstance(scale, torch.Tensor):
            c = xf.shape[-1]
            x2, o2 = xf.view(-1, c), out.view(-1, c)
            step = max(1, _CHUNK // max(c, 1))
            for i in range(0, x2.shape[0], step):
                self._round_chunk(x2[i : i + step], o2[i : i + step], saturate, rows[i : i + step])
            return out
        flat_x, flat_o = xf.view(-1), out.view(-1)
        n = flat_x.numel()
        chunk = n if xf.device.type != "cpu" else _CHUNK
        for i in range(0, n, max(chunk, 1)):
            self._round_chunk(flat_x[i : i + chunk], flat_o[i : i + chunk], saturate, scale)
        return out

    def _round_gpu(self, xf: torch.Tensor, scale: torch.Tensor | None, saturate: bool) -> torch.Tensor | None:
        """The one-kernel CUDA path; None when Triton is missing or fails here (the caller runs eager)."""
        try:
            from lowbit.kernels.triton_round import round_cuda

            return round_cuda(self, xf, scale, saturate)
        except Exception as e:  # no working Triton here: the eager path gives the same bits
            _disable_kernel(e)
            return None

    def _round_chunk(
        self, xc: torch.Tensor, o: torch.Tensor, saturate: bool, scale: float | torch.Tensor | None
    ) -> None:
        a = torch.abs(xc, out=o) if scale is None else torch.div(xc, scale, out=o).abs_()
        if saturate:
            a.clamp_(max=self.max)
        s = 23 - self.mbits
        if s:
            b = a.view(torch.int32)
            t = b >> s
            t &= 1  # lowest kept bit: ties round up only when it is odd
            if self._flip_parity:
                t ^= 1
            t += (1 << (s - 1)) - 1
            t += b
            t &= ~((1 << s) - 1)
            normal = t.view(torch.float32)
        else:
            normal = a.clone()
        if self.emin < -126:  # normal binades below float32's: round them scaled up by 2^64 (exact)
            lo = a < _F32_MIN_NORMAL
            if bool(lo.any()):
                normal = torch.where(lo, self._round_normal_scaled(a), normal)
        if self.subnormals:
            c = 2.0 ** (self.emin - self.mbits + 23)  # float32 ulp of c == the subnormal step
            sub = a + c
            sub -= c
            # `a >= min_normal` is False for NaN, so NaN takes the subnormal path, where it stays NaN
            torch.where(a >= self.min_normal, normal, sub, out=o)
        else:
            low = self.min_normal
            torch.where(a >= low, normal, torch.where(torch.isnan(a), a, torch.full_like(a, low)), out=o)
        if not saturate:
            over = o > self.max
            o.masked_fill_(over, math.inf if self.convention == "ieee" else math.nan)
        if self.signed:
            o.copysign_(xc)
        if scale is not None:
            o.mul_(scale)

    def _round_normal_scaled(self, a: torch.Tensor) -> torch.Tensor:
        up = a * 2.0**64
        s = 23 - self.mbits
        b = up.view(torch.int32)
        t = (((b >> s) & 1) ^ int(self._flip_parity)) + ((1 << (s - 1)) - 1 if s else 0) + b
        t &= ~((1 << s) - 1)
        return t.view(torch.float32) * 2.0**-64

    def quantize_dequantize(
        self, x: torch.Tensor, scale: torch.Tensor | float = 1.0, *, saturate: bool = True
    ) -> torch.Tensor:
        """(x / scale) on this grid, times scale, in x's dtype. scale broadcasts against x."""
        if not isinstance(scale, torch.Tensor) and float(scale) == 1.0:
            return self.round(x, saturate=saturate).to(x.dtype)
        return self.round(x, saturate=saturate, scale=scale).to(x.dtype)

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """Saturating cast of an already scaled tensor: torch's dtype when it has one, else grid values in float32.

        The explicit clamp makes saturation lowbit's, not the installed torch's (torch 2.13 CPU
        saturates E4M3FN casts, torch 2.11 CUDA gives NaN).
        """
        dt = self.dtype
        if dt is None:
            return self.round(x)
        if not self.torch_rounds:
            return self.round(x).to(dt)  # exact: the value is already on the grid
        return x.clamp(-self.max, self.max).to(dt)

    # --- codes -----------------------------------------------------------------------------------------------
    def all_codes(self) -> torch.Tensor:
        """Every code 0 .. 2^bits - 1 as int64 (formats of at most 20 bits)."""
        if self.bits > 20:
            raise ValueError(f"{self.name}: {self.bits}-bit codes are too many to enumerate")
        return torch.arange(2**self.bits, dtype=torch.int64)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (sign | exponent | mantissa, sign highest) to float32 values, exactly."""
        c = codes.to(torch.int64)
        if bool(((c < 0) | (c >= 2**self.bits)).any()):
            raise ValueError(f"{self.name}: codes must be in 0..{2**self.bits - 1}")
        mant = c & (2**self.mbits - 1)
        fld = (c >> self.mbits) & (2**self.ebits - 1)
        neg = (
            ((c >> (self.ebits + self.mbits)) & 1).bool()
            if self.signed
            else torch.zeros_like(c, dtype=torch.bool)
        )
        m = mant.double()
        if self.subnormals:
            mag = torch.where(
                fld == 0,
                m * 2.0 ** (self.emin - self.mbits),
                (1 + m / 2**self.mbits) * torch.pow(2.0, (fld - self._bias).double()),
            )
        else:
            mag = (1 + m / 2**self.mbits) * torch.pow(2.0, (fld - self._bias).double())
        val = torch.where(neg, -mag, mag)
        top = fld == 2**self.ebits - 1
        if self.convention == "ieee":
            val = torch.where(top & (mant == 0), torch.where(neg, -math.inf, math.inf), val)
            val = torch.where(top & (mant != 0), math.nan, val)
        elif self.convention == "fn":
            val = torch.where(top & (mant == 2**self.mbits - 1), math.nan, val)
        elif self.convention == "fnuz":
            val = torch.where(neg & (fld == 0) & (mant == 0), math.nan, val)
        return val.float()

    def _positive_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.arange(2 ** (self.ebits + self.mbits), dtype=torch.int64)
        vals = self.decode(codes)
        keep = torch.isfinite(vals)
        return vals[keep], codes[keep]

    def nan_code(self) -> int:
        if self.convention == "ieee":
            return (2**self.ebits - 1) << self.mbits | (1 << max(self.mbits - 1, 0))
        if self.convention == "fn":
            return 2 ** (self.ebits + self.mbits) - 1
        if self.convention == "fnuz":
            return 1 << (self.ebits + self.mbits)
        raise ValueError(f"{self.name} has no NaN code")

    def encode(self, x: torch.Tensor, *, saturate: bool = True) -> torch.Tensor:
        """Round x to the grid and return its codes (int64, same shape). Formats of at most 20 bits.

        NaN becomes the format's NaN code (an error for formats without one); -0 keeps its sign code
        except in fnuz, where it is 0.
        """
        r = self.round(x, saturate=saturate)
        vals, codes = self._positive_table()
        a = r.abs()
        nan = torch.isnan(a)
        if bool(nan.any()) and not self.has_nan:
            raise ValueError(f"{self.name} has no NaN: {int(nan.sum())} NaN input(s) cannot be encoded")
        inf = torch.isinf(a)
        idx = torch.searchsorted(vals, torch.where(nan | inf, 0.0, a)).clamp_(max=vals.numel() - 1)
        out = codes[idx]
        if self.has_inf:
            out = torch.where(inf, torch.tensor((2**self.ebits - 1) << self.mbits), out)
        if self.signed:
            sign_bit = 1 << (self.ebits + self.mbits)
            neg = torch.signbit(r) & ~nan
            if self.convention == "fnuz":
                neg &= a != 0
            out = torch.where(neg, out | sign_bit, out)
        if self.has_nan:
            out = torch.where(nan, torch.tensor(self.nan_code()), out)
        return out

    def values(self) -> torch.Tensor:
        """Distinct finite values, ascending (+0 and -0 count once), float32."""
        vals = self.decode(self.all_codes())
        return torch.unique(vals[torch.isfinite(vals)] + 0.0)  # + 0.0 merges -0 into +0

    @property
    def num_finite(self) -> int:
        return int(self.values().numel())


# One Triton kernel on CUDA (lowbit.kernels.triton_round): the eager chunked path launches about
# ten kernels per call on a GPU. Set LOWBIT_NO_TRITON=1 to use the eager path there.
_USE_KERNEL = os.environ.get("LOWBIT_NO_TRITON", "") in ("", "0")


def _disable_kernel(err: Exception) -> None:
    global _USE_KERNEL
    _USE_KERNEL = False
    logging.getLogger("lowbit").warning(
        "the Triton kernel of the format simulator failed (%s); using the eager path (same results, slower)",
        str(err).splitlines()[0][:200] if str(err) else type(err).__name__,
    )


def check_scales(scale: torch.Tensor) -> None:
    """Refuse zero, negative, inf or NaN scales: each would silently give wrong values."""
    if not bool(((scale > 0) & torch.isfinite(scale)).all()):
        raise ValueError(
            "scales must be positive and finite (a zero, negative or NaN scale would be a wrong answer)"
        )


def _refuse_negative(fmt: Minifloat, x: torch.Tensor) -> None:
    if bool((x < 0).any()):
        raise ValueError(f"{fmt.name} is unsigned: {int((x < 0).sum())} negative input(s)")


# --- named formats -----------------------------------------------------------------------------------------------
E4M3FN = Minifloat(4, 3, convention="fn", name="e4m3fn", torch_dtype="float8_e4m3fn", torch_rounds=True)
E5M2 = Minifloat(5, 2, convention="ieee", name="e5m2", torch_dtype="float8_e5m2", torch_rounds=True)
E4M3FNUZ = Minifloat(
    4, 3, convention="fnuz", name="e4m3fnuz", torch_dtype="float8_e4m3fnuz", torch_rounds=True
)
E5M2FNUZ = Minifloat(
    5, 2, convention="fnuz", name="e5m2fnuz", torch_dtype="float8_e5m2fnuz", torch_rounds=True
)
# E3M4 and E2M5 have no standard: lowbit gives them E4M3FN's convention (no inf, one NaN code).
E3M4 = Minifloat(3, 4, convention="fn", name="e3m4")
E2M5 = Minifloat(2, 5, convention="fn", name="e2m5")
# OCP Microscaling v1.0 element formats (no inf, no NaN) and its E8M0 scale.
E3M2 = Minifloat(3, 2, convention="finite", name="e3m2")
E2M3 = Minifloat(2, 3, convention="finite", name="e2m3")
E2M1 = Minifloat(2, 1, convention="finite", name="e2m1", torch_dtype="float4_e2m1fn_x2")
E8M0 = Minifloat(
    8, 0, convention="fn", signed=False, subnormals=False, name="e8m0", torch_dtype="float8_e8m0fnu"
)
FP16 = Minifloat(5, 10, convention="ieee", name="fp16", torch_dtype="float16", torch_rounds=True)
BF16 = Minifloat(8, 7, convention="ieee", name="bf16", torch_dtype="bfloat16", torch_rounds=True)
TF32 = Minifloat(8, 10, convention="ieee", name="tf32")

MINIFLOATS: dict[str, Minifloat] = {
    f.name: f
    for f in (E4M3FN, E5M2, E3M4, E2M5, E3M2, E2M3, E2M1, E8M0, FP16, BF16, TF32, E4M3FNUZ, E5M2FNUZ)
}

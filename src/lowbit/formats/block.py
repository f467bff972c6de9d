"""Block-scaled minifloats: OCP Microscaling (MXFP8, MXFP6, MXFP4) and NVIDIA NVFP4.

Pure tensor functions, no modules. A block format splits the last dimension of a tensor into
blocks of `block_size` consecutive values; each block shares one scale stored in a small format
of its own, and each value is stored as an element of a `Minifloat` (`lowbit.formats.minifloat`,
which rounds to nearest, ties to the even code, with subnormals and saturation).

Shapes: x is (..., L) with any leading dims (a (E, out, in) stack of expert weights keeps its
expert dim, and every expert gets blocks of its own, since blocks never cross a row); blocks run
along the last dim, so L must be a multiple of the block size. When it is not, `block_quantize`
raises ValueError unless `pad=True`, which zero-pads the last dim up to the next multiple (a zero
never raises a block's amax, so the scales of the real values are unchanged) and records the
original length so that `block_dequantize` trims the padding off. Scales are (..., L_pad / bs).

OCP Microscaling (MX) v1.0, single level (`two_level=False`): one E8M0 scale X = 2^k per block
of 32 (section 6.3 of the spec, "conversion from a vector of scalar floats to MX", as we read it):

    k = floor(log2(max_i |V_i|)) - emax_elem,  clamped to E8M0's exponents [-127, 127]
    P_i = V_i / X rounded to the element format;  V_i ~ X * P_i

emax_elem is the exponent of the element format's largest normal, derived from the Minifloat
(`element.max_pair[1]`): 8 for E4M3, 15 for E5M2, 4 for E3M2, 2 for E2M3 and E2M1. The spec
leaves overflow of V_i / X to the implementation: lowbit saturates to +-element.max. This rule
puts the block's amax / X in [2^emax, 2^(emax+1)), and every element format's max is below
2^(emax+1), so the top of a block can clip: amax / X up to just under 512 saturates to 448 for
E4M3 (12.5% at most; E5M2 and E3M2 12.5%, E2M3 6.25%, E2M1 25%, since 8 -> 6). That is the
spec's rule, not a lowbit choice; some implementations round amax up first to avoid it
(compressed-tensors' `round_to_power_2` does), which gives different scales for blocks whose amax
has a significand >= 1.75.

Special values (MX): an all-zero block (amax 0, log2 undefined) gets the smallest scale, 2^-127
(E8M0 code 0), and its elements are exactly 0. A NaN anywhere in a block makes that block's scale
NaN (E8M0 code 0xFF) and the whole block dequantizes to NaN: the spec's rule that a NaN scale
makes every element of its block NaN whatever the elements hold (section 5.3, special values, as
we read it). lowbit treats +-inf the same way (the block becomes NaN), as microsoft/microxcaling,
the spec's reference code, does: floor(log2(inf)) is above E8M0's range, which it maps to NaN.
Other blocks are unaffected. In `block_codes` the elements of a NaN block are written as code 0
(the scale's NaN code carries the NaN; E2M1, E2M3 and E3M2 have no NaN code of their own).

NVFP4 (`two_level=True`): E2M1 elements, blocks of 16, an E4M3FN scale per block and an FP32
scale per tensor (global), so that the block scales use E4M3's range rather than its bottom:

    g   = amax(tensor) / (448 * 6)                       (float32, the dequantization multiplier)
    s_b = E4M3FN.round(amax(block) / 6 / g)              (saturating)
    e_i = E2M1.round(x_i / (s_b * g));  x_i ~ (e_i * s_b) * g

Dequantization multiplies e_i * s_b first (exact: 2 x 4 significant bits) and g last, one float32
rounding, as a kernel that applies g in its epilogue does. A block whose scale rounds to 0 (amax
below 2^-10 * 6 * g) gets zero elements, not NaN. An all-zero tensor gets g = 1. A NaN or +-inf
makes its block's scale NaN (E4M3FN code 0x7F) and that block NaN, as for MX; the global amax
ignores those blocks, so one NaN does not poison the tensor. `global_scale=` overrides g (a
calibrated value, or a tensor broadcasting against the scales, e.g. (E, 1, 1) for one per expert).

compressed-tensors stores the reciprocal: `generate_gparam` (compressed_tensors/quantization/
utils/helpers.py) computes global_scale = 448 * 6 / amax, the block scales are
global_scale * amax(block) / 6 rounded to FP8, and fake quantization divides by
scale / global_scale. Those are the same s_b, and g = 1 / global_scale; `ct_global_scale(g)`
converts (the two float32 reciprocals can differ by an ulp from computing 2688 / amax directly).

Speed: everything is vectorized over blocks (one amax pass, one division, one element rounding in
cache-sized chunks, one multiplication); a 4096 x 4096 float32 fake quantize takes about 0.2 s on
2 CPU cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lowbit.formats.minifloat import E2M1, E2M3, E3M2, E4M3FN, E5M2, E8M0, Minifloat


@dataclass(frozen=True)
class BlockFormat:
    """Elements of `element`, one `scale_format` scale per `block_size` values along the last dim.

    two_level=False: the MX rule (a power-of-two scale from the block's amax exponent; the scale
    format must have no mantissa bits). two_level=True: the NVFP4 rule (amax / element.max / g
    rounded to `scale_format`, with an FP32 per-tensor g). `with_block_size(n)` gives the same
    format with blocks of n (any n >= 1); the name is kept, the block size is part of equality.
    """

    name: str
    element: Minifloat
    block_size: int
    scale_format: Minifloat
    two_level: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"{self.name}: block_size must be an integer >= 1, got {self.block_size!r}")
        if not self.two_level and self.scale_format.mbits != 0:
            raise ValueError(
                f"{self.name}: single-level (MX) block formats use power-of-two scales; "
                f"{self.scale_format.name} has mantissa bits"
            )

    @property
    def element_emax(self) -> int:
        """Exponent of the element format's largest finite value (E4M3 8, E5M2 15, E3M2 4, E2M3/E2M1 2)."""
        return self.element.max_pair[1]

    @property
    def bits_per_element(self) -> float:
        """Storage per value: element bits plus the block scale's share (the global scale is negligible)."""
        return self.element.bits + self.scale_format.bits / self.block_size

    def with_block_size(self, block_size: int) -> BlockFormat:
        return dataclasses.replace(self, block_size=block_size)


MXFP8_E4M3 = BlockFormat("mxfp8_e4m3", E4M3FN, 32, E8M0)
MXFP8_E5M2 = BlockFormat("mxfp8_e5m2", E5M2, 32, E8M0)
MXFP6_E2M3 = BlockFormat("mxfp6_e2m3", E2M3, 32, E8M0)
MXFP6_E3M2 = BlockFormat("mxfp6_e3m2", E3M2, 32, E8M0)
MXFP4 = BlockFormat("mxfp4", E2M1, 32, E8M0)
NVFP4 = BlockFormat("nvfp4", E2M1, 16, E4M3FN, two_level=True)

BLOCK_FORMATS: dict[str, BlockFormat] = {
    "mxfp8_e4m3": MXFP8_E4M3,
    "mxfp8": MXFP8_E4M3,
    "mxfp8_e5m2": MXFP8_E5M2,
    "mxfp6_e2m3": MXFP6_E2M3,
    "mxfp6": MXFP6_E2M3,
    "mxfp6_e3m2": MXFP6_E3M2,
    "mxfp4": MXFP4,
    "nvfp4": NVFP4,
}


def get_block_format(name: str) -> BlockFormat:
    """The block format called `name` (case-insensitive; aliases: mxfp8 = mxfp8_e4m3, mxfp6 = mxfp6_e2m3)."""
    fmt = BLOCK_FORMATS.get(name.lower())
    if fmt is None:
        raise ValueError(f"unknown block format {name!r}; known: {', '.join(sorted(BLOCK_FORMATS))}")
    return fmt


@dataclass(frozen=True)
class BlockQuantized:
    """A block-quantized tensor.

    values: element grid values, float32, x's shape with the last dim padded to a multiple of the
    block size (NaN in NaN blocks). scales: float32 (..., n_blocks), each exactly a value of
    fmt.scale_format (or NaN). global_scale: float32 (0-dim, or broadcasting against scales) for
    two-level formats, the dequantization multiplier g; None for MX. orig_len: the last dim of x
    before padding.
    """

    values: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    orig_len: int
    fmt: BlockFormat


def ct_global_scale(g: torch.Tensor | float) -> torch.Tensor:
    """compressed-tensors' `*_global_scale` (448 * 6 / amax, a divisor) from lowbit's g (a multiplier)."""
    return 1.0 / torch.as_tensor(g, dtype=torch.float32)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k exactly as float32, for integer k in [-149, 127] (subnormals built from their bits)."""
    k = k.to(torch.int32)
    normal = (k + 127).clamp(min=1) << 23
    sub = torch.ones_like(k) << (k + 149).clamp(min=0, max=22)
    return torch.where(k >= -126, normal, sub).view(torch.float32)


def _blocks(x: torch.Tensor, fmt: BlockFormat, pad: bool) -> tuple[torch.Tensor, int]:
    """x as float32 (..., n_blocks, block_size), zero-padded when allowed, and x's last dim."""
    if x.dim() == 0:
        raise ValueError("block quantization needs at least one dimension (blocks run along the last)")
    if not x.is_floating_point():
        raise ValueError(f"block quantization takes floating-point tensors, got {x.dtype}")
    bs = fmt.block_size
    n = x.shape[-1]
    xf = x.float()
    rem = n % bs
    if rem:
        if not pad:
            raise ValueError(
                f"{fmt.name}: block size {bs} does not divide the last dimension {n} of a tensor of shape "
                f"{tuple(x.shape)}; pass pad=True to zero-pad it to {n + bs - rem} (trimmed on dequantize)"
            )
        xf = torch.nn.functional.pad(xf, (0, bs - rem))
    return xf.unflatten(-1, (xf.shape[-1] // bs, bs)), n


def _block_amax(xb: torch.Tensor) -> torch.Tensor:
    """max |x| per block (..., n_blocks); NaN if the block holds a NaN, inf if it holds +-inf."""
    return torch.maximum(xb.amax(dim=-1), xb.amin(dim=-1).neg())


def _mx_scales(amax: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """X = 2^(floor(log2 amax) - emax_elem), clamped to the scale format; 2^lo for 0; NaN for NaN/inf."""
    lo, hi = fmt.scale_format.emin, fmt.scale_format.max_pair[1]
    _, e = torch.frexp(amax)  # amax = m * 2^e with m in [0.5, 1): floor(log2 amax) = e - 1, exactly
    k = (e - 1 - fmt.element_emax).clamp_(lo, hi)
    k = torch.where(amax > 0, k, lo)  # all-zero block (frexp(0) gives e = 0): the smallest scale
    return torch.where(torch.isfinite(amax), _pow2(k), torch.nan)


def _global_scale(amax: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """g = amax(tensor) / (scale max * element max), over the finite blocks; 1 for an all-zero tensor."""
    finite = torch.where(torch.isfinite(amax), amax, 0.0)
    top = finite.max() if finite.numel() else torch.zeros((), dtype=torch.float32, device=amax.device)
    g = top / (fmt.scale_format.max * fmt.element.max)
    # a tiny amax would underflow g to a subnormal or 0 (then s_b = inf): keep g a float32 normal
    g = g.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(top > 0, g, 1.0)


def _check_global_scale(global_scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=device)
    if not bool(torch.all(torch.isfinite(g) & (g > 0))):
        raise ValueError(
            "global_scale must be positive and finite (lowbit's g = amax / (448 * 6), a multiplier)"
        )
    return g


def _quantize_blocks(
    xb: torch.Tensor, fmt: BlockFormat, global_scale: torch.Tensor | float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(values (..., nb, bs), scales (..., nb), g or None)."""
    amax = _block_amax(xb)
    if not fmt.two_level:
        if global_scale is not None:
            raise ValueError(f"{fmt.name} has no global scale (it is a single-level block format)")
        scales = _mx_scales(amax, fmt)
        return fmt.element.round(xb / scales.unsqueeze(-1)), scales, None
    g = _global_scale(amax, fmt) if global_scale is None else _check_global_scale(global_scale, xb.device)
    scales = fmt.scale_format.round(amax / fmt.element.max / g)
    scales = torch.where(torch.isfinite(amax), scales, torch.nan)
    eff = scales * g
    # a block scale of 0 would divide by 0: dividing by inf instead gives zero elements
    values = fmt.element.round(xb / torch.where(eff == 0, torch.inf, eff).unsqueeze(-1))
    return values, scales, g


def block_quantize(
    x: torch.Tensor,
    fmt: BlockFormat,
    *,
    pad: bool = False,
    global_scale: torch.Tensor | float | None = None,
) -> BlockQuantized:
    """x (..., L) to element grid values and block scales (see the module docstring for the rules).

    pad=True zero-pads L to a multiple of the block size (else a ragged L is a ValueError).
    global_scale (two-level formats only) replaces the computed g = amax(x) / (448 * 6).
    """
    xb, n = _blocks(x, fmt, pad)
    values, scales, g = _quantize_blocks(xb, fmt, global_scale)
    return BlockQuantized(values.flatten(-2), scales, g, n, fmt)


def _dequantize_blocks(
    values: torch.Tensor, scales: torch.Tensor, g: torch.Tensor | None, orig_len: int, dtype: torch.dtype
) -> torch.Tensor:
    """values (..., nb, bs) times their block scale (and g last), flattened, trimmed, cast to dtype."""
    out = values * scales.unsqueeze(-1)  # exact: a power of two, or (NVFP4) 2 x 4 significant bits
    if g is not None:
        out.mul_(g.unsqueeze(-1) if g.dim() else g)
    out = out.flatten(-2)
    if out.shape[-1] != orig_len:
        out = out[..., :orig_len]
    return out.to(dtype)


def block_dequantize(q: BlockQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor q stands for, in `dtype`, with the padding trimmed: x's shape (..., orig_len).

    values * scale per block, times g for two-level formats (one float32 rounding, then one to dtype).
    """
    bs = q.fmt.block_size
    values = q.values.unflatten(-1, (q.values.shape[-1] // bs, bs))
    return _dequantize_blocks(values, q.scales, q.global_scale, q.orig_len, dtype)


def block_fake_quantize(
    x: torch.Tensor,
    fmt: BlockFormat,
    *,
    pad: bool = False,
    global_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """block_dequantize(block_quantize(x, fmt, ...), x.dtype) without the intermediate object."""
    xb, n = _blocks(x, fmt, pad)
    if not fmt.two_level and global_scale is None:
        # MX: values * X is exact (X a power of two), so divide, round and multiply in the
        # simulator's fused pass (one kernel on a GPU) give the same bits as the two steps
        out = fmt.element.round(xb, scale=_mx_scales(_block_amax(xb), fmt).unsqueeze(-1)).flatten(-2)
        return (out[..., :n] if out.shape[-1] != n else out).to(x.dtype)
    values, scales, g = _quantize_blocks(xb, fmt, global_scale)
    return _dequantize_blocks(values, scales, g, n, x.dtype)


def block_codes(q: BlockQuantized) -> tuple[torch.Tensor, torch.Tensor]:
    """(element codes, scale codes), both uint8, for export and packing (one code per byte, unpacked).

    Element codes have the padded shape of q.values, scale codes that of q.scales; they are the
    formats' bit patterns (`Minifloat.encode`): E8M0 code = exponent + 127 (0xFF NaN), E4M3FN codes
    for NVFP4 scales (0x7F NaN). Elements of NaN blocks are written as 0. The global scale of a
    two-level format is stored as the float32 it is (`ct_global_scale` for compressed-tensors).
    """
    fmt = q.fmt
    bs = fmt.block_size
    values = q.values.unflatten(-1, (q.values.shape[-1] // bs, bs))
    values = torch.where(torch.isnan(q.scales).unsqueeze(-1), 0.0, values)
    elem = fmt.element.encode(values).flatten(-2).to(torch.uint8)
    scale = fmt.scale_format.encode(q.scales).to(torch.uint8)
    return elem, scale

"""NF4: the 4-bit NormalFloat of QLoRA (Dettmers et al. 2023), as stored by bitsandbytes.

A block of `block_size` consecutive values along the last dimension shares one float32 absmax.
Each value is divided by its block's absmax, which puts it in [-1, 1], and replaced by the index
(0..15) of the nearest of 16 fixed levels. The levels are quantiles of a standard normal
distribution, rescaled to [-1, 1], with one more level above zero than below so that 0 itself is
a level. Dequantization is levels[code] * absmax.

Codes are returned one per uint8 (values 0..15), unpacked. To store two per byte use
`lowbit.formats.packing.pack_nibbles`, which puts the first element of each pair in the low
nibble; note that bitsandbytes' own 4-bit storage puts the first element in the high nibble.

Non-finite input raises ValueError: NF4 has no NaN or inf code, and one inf would make its
block's absmax infinite and every other value of that block 0 or NaN.
"""

from __future__ import annotations

import torch

# The bitsandbytes NF4 table, ascending: index 0 is -1.0, index 7 is 0.0, index 15 is 1.0.
# Every entry is a float32 value; `nf4_levels_from_normal()` reproduces them bit for bit.
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# Decision boundaries between neighbouring levels: the float32 midpoints. These are the same
# float32 numbers as the thresholds of bitsandbytes' NF4 decision tree (checked in the tests).
NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2

ZERO_CODE = 7  # index of the level 0.0


def nf4_levels_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 levels rebuilt from standard normal quantiles (float32, ascending).

    Positive side: the quantiles at 8 probabilities evenly spaced from `offset` down to (but not
    including) 0.5; negative side: minus the quantiles at 7 such probabilities; plus 0. Using 8
    positive and 7 negative levels is what makes 0 exactly representable with 16 codes. All are
    divided by the largest (the quantile at `offset`) so the levels span [-1, 1].

    The default `offset` is 1 - (1/32 + 1/30) / 2, the mean of 1 - 1/(2*16) and 1 - 1/(2*15):
    the centre of the outermost probability bin with 16 and with 15 bins. Any offset below 1
    keeps the end quantiles finite (the quantile at probability 1 is infinite).

    The roundings follow the reference construction step by step: probabilities evenly spaced
    in float32, quantiles evaluated in float64 (torch.special.ndtri), stored as float32, and the
    division by the maximum done in float32. Doing the same roundings is what lets the result
    equal the published table exactly rather than to within a float32 ulp.
    """
    pos_p = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1]
    neg_p = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1]
    pos = torch.special.ndtri(pos_p.double()).float()
    neg = (-torch.special.ndtri(neg_p.double())).float()
    levels = torch.cat([neg, torch.zeros(1), pos]).sort().values
    return levels / levels.max()


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def quantize_nf4(
    x: torch.Tensor, block_size: int = 64, *, pad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes and per-block absmax of x.

    x: (..., n). Returns codes (..., n_padded) uint8 in 0..15 and absmax (..., n_padded /
    block_size) float32, where n_padded = n rounded up to a multiple of block_size.

    If n is not a multiple of block_size this raises ValueError unless `pad=True`; then x is
    padded with zeros at the end of the last dim. Zeros do not change a block's absmax, so the
    real values quantize exactly as they would in a longer tensor; the zero-padded tail gets
    code 7 (level 0.0). The padding stays in the returned codes: pass `shape=x.shape` to
    `dequantize_nf4` to drop it.

    Nearest level: x / absmax (float32 division) is compared with the 15 float32 midpoints
    between neighbouring levels using torch.bucketize. A value exactly on a midpoint goes to the
    LOWER level (towards -1), the same rule as bitsandbytes' `x > threshold` decision tree.
    bitsandbytes' CUDA kernel multiplies by the reciprocal of absmax instead of dividing, so a
    value within one float32 rounding of a midpoint may land on the other neighbour there.

    An all-zero block has absmax 0; its values are divided by 1 instead, so they map to code 7
    and dequantize to exactly 0.
    """
    _check_block_size(block_size)
    xf = x.detach().float()
    bad = int((~torch.isfinite(xf)).sum())
    if bad:
        raise ValueError(f"{bad} NaN or infinite value(s) in the input: NF4 has no code for them")
    n = xf.shape[-1]
    rest = n % block_size
    if rest:
        if not pad:
            raise ValueError(
                f"last dimension {n} is not a multiple of block_size {block_size}; "
                "pass pad=True to zero-pad it (and shape= to dequantize_nf4 to trim)"
            )
        xf = torch.nn.functional.pad(xf, (0, block_size - rest))
    blocks = xf.unflatten(-1, (xf.shape[-1] // block_size, block_size))
    absmax = blocks.abs().amax(dim=-1)
    divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(-1)
    mids = NF4_MIDPOINTS.to(xf.device)
    codes = torch.bucketize(blocks / divisor, mids, right=False)
    return codes.flatten(-2).to(torch.uint8), absmax


def dequantize_nf4(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    block_size: int = 64,
    dtype: torch.dtype = torch.float32,
    *,
    shape: torch.Size | tuple[int, ...] | None = None,
) -> torch.Tensor:
    """levels[codes] * absmax, computed in float32 and rounded once to `dtype`.

    codes: (..., n_padded) uint8 0..15; absmax: (..., n_padded / block_size). `shape`, when
    given, is the shape of the tensor that was quantized: the zero padding added by
    `quantize_nf4(..., pad=True)` is cut off the last dimension and the result has that shape.
    """
    _check_block_size(block_size)
    if codes.dtype != torch.uint8:
        raise ValueError(f"NF4 codes must be torch.uint8, got {codes.dtype}")
    n = codes.shape[-1]
    if n % block_size or absmax.shape[-1] != n // block_size:
        raise ValueError(
            f"{n} codes with block_size {block_size} do not match absmax of shape {tuple(absmax.shape)}"
        )
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"NF4 codes must be in 0..15, got a maximum of {int(codes.max())}")
    values = NF4_LEVELS.to(codes.device)[codes.long()]
    out = values * absmax.float().repeat_interleave(block_size, dim=-1)
    if shape is not None:
        shape = tuple(shape)
        if tuple(out.shape[:-1]) != shape[:-1] or not 0 <= out.shape[-1] - shape[-1] < block_size:
            raise ValueError(
                f"codes of shape {tuple(codes.shape)} cannot come from a tensor of shape {shape}"
            )
        out = out[..., : shape[-1]]
    return out.to(dtype)


def fake_quantize_nf4(x: torch.Tensor, block_size: int = 64, *, pad: bool = False) -> torch.Tensor:
    """NF4 quantize-dequantize in x's dtype and shape (pad as in `quantize_nf4`, trimmed here)."""
    codes, absmax = quantize_nf4(x, block_size, pad=pad)
    return dequantize_nf4(codes, absmax, block_size, x.dtype, shape=x.shape)

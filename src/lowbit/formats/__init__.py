"""Numerics only: number formats, scales and granularities. No nn.Module here.

- `minifloat`: any ExMy float (E4M3FN, E5M2, E3M4, E2M1, E8M0, BF16, ...), simulated exactly;
- `integer`: INT8/INT4 and unsigned, symmetric or with a zero point; `nf4`: QLoRA's NormalFloat;
- `block`: OCP MX (MXFP8/6/4) and NVFP4 block-scaled formats;
- `float8`: scaled quantize / dequantize / fake quantize for the FP8 schemes (any Minifloat);
- `granularity`: per tensor / channel / token / group reductions; `packing`: INT4 and FP4 bit packing;
- `registry`: every named format by name (`get_format`), with the table and explanations.
"""

from lowbit.formats.block import BLOCK_FORMATS, MXFP4, NVFP4, BlockFormat, block_fake_quantize, block_quantize
from lowbit.formats.float8 import (
    E4M3,
    E5M2,
    FORMATS,
    FloatFormat,
    dequantize,
    fake_quantize,
    fake_quantize_lsq,
    fake_quantize_ste,
    mse_scale,
    quantize,
    scale_from_amax,
)
from lowbit.formats.granularity import absmax
from lowbit.formats.integer import INT4, INT8, IntFormat
from lowbit.formats.minifloat import BF16, E2M1, E3M4, E4M3FN, E8M0, FP16, MINIFLOATS, Minifloat

__all__ = [
    "BF16",
    "BLOCK_FORMATS",
    "E2M1",
    "E3M4",
    "E4M3",
    "E4M3FN",
    "E5M2",
    "E8M0",
    "FORMATS",
    "FP16",
    "INT4",
    "INT8",
    "MINIFLOATS",
    "MXFP4",
    "NVFP4",
    "BlockFormat",
    "FloatFormat",
    "IntFormat",
    "Minifloat",
    "absmax",
    "block_fake_quantize",
    "block_quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_lsq",
    "fake_quantize_ste",
    "mse_scale",
    "quantize",
    "scale_from_amax",
]

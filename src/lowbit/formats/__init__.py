"""Numerics only: number formats, scales and granularities. No nn.Module here."""

from lowbit.formats.float8 import (
    E4M3,
    E5M2,
    FORMATS,
    FloatFormat,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    mse_scale,
    quantize,
    scale_from_amax,
)
from lowbit.formats.granularity import absmax

__all__ = [
    "E4M3",
    "E5M2",
    "FORMATS",
    "FloatFormat",
    "absmax",
    "dequantize",
    "fake_quantize",
    "fake_quantize_ste",
    "mse_scale",
    "quantize",
    "scale_from_amax",
]

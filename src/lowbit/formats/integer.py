"""Integer formats (INT8, INT4, UINT8, UINT4, any width 2..16): affine quantize / dequantize.

Pure tensor functions, no modules. A code q stands for the real value (q - zero_point) * scale;
quantize rounds half to even (torch.round) and saturates to [qmin, qmax]. All arithmetic runs in
float32, which holds every integer code of a format up to 16 bits exactly.

Non-finite values:
  * NaN input raises ValueError naming how many NaNs there are. An integer format has no NaN
    code, and writing any code in its place (0, zero_point, qmax) would be a silently wrong
    answer that no reader can detect.
  * +-inf saturate to qmax / qmin like any other out-of-range value.
  * A non-finite range (amin/amax from data that held inf or NaN) is refused by
    `scale_zero_point`: an infinite scale would turn every finite value into the zero point.

Shapes: `x` is any shape; `scale` and `zero_point` broadcast against it, or (for groups) have a
last dimension `x.shape[-1] // group_size` and are expanded along the last dimension with
`lowbit.formats.float8.expand_scale`, exactly as the FP8 functions do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.float8 import MIN_SCALE, expand_scale
from lowbit.formats.granularity import Strategy
from lowbit.formats.minifloat import check_scales


@dataclass(frozen=True)
class IntFormat:
    """A two's complement (signed) or plain binary (unsigned) integer element format."""

    name: str
    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"{self.name}: bits must be an integer from 2 to 16, got {self.bits!r}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """The narrowest torch integer dtype that holds [qmin, qmax].

        Up to 8 bits: int8 (signed) or uint8 (unsigned). Wider: int16, or int32 for UINT16 whose
        qmax 65535 does not fit int16 (torch's uint16 has too few ops to be a useful carrier).
        """
        if self.bits <= 8:
            return torch.int8 if self.signed else torch.uint8
        if self.qmax <= torch.iinfo(torch.int16).max:
            return torch.int16
        return torch.int32


    # --- the interface the scaled (symmetric) functions of `lowbit.formats.float8` use, shared with
    # Minifloat, so an integer grid plugs into the same quantize / fake-quantize / scale-search code.
    @property
    def max(self) -> float:
        """The largest code: what a symmetric scale maps absmax onto (scale = absmax / max)."""
        return float(self.qmax)

    @property
    def dtype(self) -> torch.dtype:
        return self.storage_dtype

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """Round an already scaled tensor half to even and saturate: codes in the storage dtype."""
        return quantize(x, torch.ones((), device=x.device), torch.zeros((), device=x.device), self)

    def quantize_dequantize(self, x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Symmetric fake quantization (zero point 0) in x's dtype; scale broadcasts against x."""
        s = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), device=x.device)
        return fake_quantize(x, s, torch.zeros((), device=x.device), self)


INT8 = IntFormat("int8", 8, True)
INT4 = IntFormat("int4", 4, True)
UINT8 = IntFormat("uint8", 8, False)
UINT4 = IntFormat("uint4", 4, False)

INT_FORMATS: dict[str, IntFormat] = {"int8": INT8, "int4": INT4, "uint8": UINT8, "uint4": UINT4}


def amin_amax(
    x: torch.Tensor, strategy: Strategy, *, matrix_dims: int = 2, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min x, max x) reduced according to `strategy`, keepdim, float32.

    Same reductions as `granularity.absmax`: "tensor" over the last `matrix_dims` dims,
    "channel"/"token" over the last dim, "group" over runs of `group_size` along the last dim,
    giving (..., in / group_size). Leading dims (experts) always keep their own range.
    """
    a = x.detach().float()
    if strategy == "tensor":
        dims = tuple(range(x.dim() - matrix_dims, x.dim()))
        return a.amin(dim=dims, keepdim=True), a.amax(dim=dims, keepdim=True)
    if strategy in ("channel", "token"):
        return a.amin(dim=-1, keepdim=True), a.amax(dim=-1, keepdim=True)
    if strategy == "group":
        if not group_size or group_size < 0 or x.shape[-1] % group_size:
            raise ValueError(f"group size {group_size} does not divide the last dimension {x.shape[-1]}")
        g = a.unflatten(-1, (x.shape[-1] // group_size, group_size))
        return g.amin(dim=-1), g.amax(dim=-1)
    raise ValueError(f"unknown strategy {strategy!r}")


def _check_finite_range(amin: torch.Tensor, amax: torch.Tensor) -> None:
    bad = int((~torch.isfinite(amin)).sum()) + int((~torch.isfinite(amax)).sum())
    if bad:
        raise ValueError(
            f"{bad} range bound(s) are NaN or infinite: a scale computed from them would be NaN or "
            "infinite and every code meaningless; observe finite data"
        )


def scale_zero_point(
    amin: torch.Tensor, amax: torch.Tensor, fmt: IntFormat, *, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) that map [amin, amax] onto fmt's codes.

    Symmetric (signed formats only): scale = max(|amin|, |amax|) / qmax, zero point 0. Dividing
    by qmax (127 for INT8) rather than by (qmax - qmin) / 2 puts +-absmax exactly on +-qmax, so
    the largest magnitude is never clipped; the code qmin (-128) is then reached only by values
    beyond the observed range. Unsigned formats have no code below 0, so symmetric is refused.

    Asymmetric: the range is first widened to contain 0 (min <= 0 <= max). That keeps the zero
    point inside [qmin, qmax], so real 0 (padding, ReLU zeros, masked entries) quantizes to the
    integer code zero_point and dequantizes back to exactly 0. Then
    scale = (max - min) / (qmax - qmin) and zero_point = round(qmin - min / scale), rounded half
    to even and clamped to [qmin, qmax] (the clamp only absorbs float rounding at the ends).

    Scales are clamped to at least MIN_SCALE (1e-12): an all-zero channel or group gets a tiny
    finite scale and quantizes to its zero point, never to NaN.
    """
    _check_finite_range(amin, amax)
    lo, hi = amin.float(), amax.float()
    if symmetric:
        if not fmt.signed:
            raise ValueError(f"symmetric quantization needs a signed format; {fmt.name} is unsigned")
        scale = (torch.maximum(lo.abs(), hi.abs()) / fmt.qmax).clamp_min(MIN_SCALE)
        return scale, torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (fmt.qmax - fmt.qmin)).clamp_min(MIN_SCALE)
    zero_point = torch.round(fmt.qmin - lo / scale).clamp(fmt.qmin, fmt.qmax)
    return scale, zero_point.to(torch.int32)


def _scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in float32 with NaN refused and +-inf kept infinite (inf / inf would be NaN)."""
    xf = x.float()
    nans = int(torch.isnan(xf).sum())
    if nans:
        raise ValueError(
            f"{nans} NaN value(s) in the input: integer formats have no NaN code, and writing any "
            "code in its place would be silently wrong"
        )
    y = xf / expand_scale(scale.float(), xf)
    return torch.where(torch.isinf(xf), xf, y)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """clamp(round_half_even(x / scale) + zero_point, qmin, qmax) as fmt.storage_dtype (x's shape)."""
    zp = expand_scale(zero_point, x).float()
    q = (torch.round(_scaled(x, scale)) + zp).clamp(fmt.qmin, fmt.qmax)
    return q.to(fmt.storage_dtype)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(q - zero_point) * scale computed in float32, rounded once to `dtype`.

    q - zero_point is an exact small integer in float32, so the only rounding before the final
    cast is the product's own.
    """
    zp = expand_scale(zero_point, q).float()
    return ((q.float() - zp) * expand_scale(scale.float(), q)).to(dtype)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: IntFormat
) -> torch.Tensor:
    """Quantize-dequantize in x's dtype: what an integer kernel sees, for emulation.

    Equal to dequantize(quantize(x, ...), ...) element for element, computed in place in
    cache-sized chunks (one pass over memory instead of eight) when the scale is one number or one
    per row ((..., 1): channel or token; group scales are unflattened to that shape first).
    """
    s, zp = scale.float(), zero_point.float()
    if s.dim() == x.dim() and s.dim() > 0 and s.shape[-1] not in (1, x.shape[-1]):  # (..., G) groups
        groups = s.shape[-1]
        if x.shape[-1] % groups:
            raise ValueError(f"{x.shape[-1]} values do not split into {groups} groups")
        zg = zp.unsqueeze(-1) if zp.dim() == s.dim() else zp
        y = fake_quantize(x.unflatten(-1, (groups, x.shape[-1] // groups)), s.unsqueeze(-1), zg, fmt)
        return y.flatten(-2)
    check_scales(s)
    xf = x.float().contiguous()
    if xf.dim() == 0 or not _rowwise(s, xf) or not _rowwise(zp, xf):
        return dequantize(quantize(x, scale, zero_point, fmt), scale, zero_point, x.dtype)
    c = xf.shape[-1]
    s_rows = s.expand(*xf.shape[:-1], 1).reshape(-1, 1).to(xf.device)
    z_rows = zp.expand(*xf.shape[:-1], 1).reshape(-1, 1).to(xf.device)
    x2 = xf.view(-1, c)
    out = torch.empty_like(x2)
    step = max(1, _CHUNK // max(c, 1)) if xf.device.type == "cpu" else x2.shape[0]
    nans = 0
    for i in range(0, x2.shape[0], step):
        o, sc, zc = out[i : i + step], s_rows[i : i + step], z_rows[i : i + step]
        torch.div(x2[i : i + step], sc, out=o)  # +-inf stays +-inf (scales are finite, > 0)
        nans += int(torch.isnan(o).sum())
        o.round_().add_(zc).clamp_(fmt.qmin, fmt.qmax).sub_(zc).mul_(sc)
    if nans:
        raise ValueError(
            f"{nans} NaN value(s) in the input: integer formats have no NaN code, and writing any "
            "code in its place would be silently wrong"
        )
    return out.view(xf.shape).to(x.dtype)


_CHUNK = 1 << 18  # elements per in-place pass on CPU: 1 MiB of float32, stays in L2


def _rowwise(t: torch.Tensor, x: torch.Tensor) -> bool:
    """A scale or zero point that is one number, or one per row of x (shape (..., 1))."""
    if t.numel() == 1:
        return True
    return t.dim() <= x.dim() and t.shape[-1] == 1 and all(
        a in (1, b) for a, b in zip(reversed(t.shape[:-1]), reversed(x.shape[:-1]), strict=False)
    )


class _FakeQuantSTE(torch.autograd.Function):
    """Straight-through estimator: identity gradient where no clipping happens, zero where it does.

    "No clipping" means the unclamped code round(x / scale) + zero_point lies in [qmin, qmax]:
    such an x is only rounded, so the identity is the right surrogate. This is the same mask as
    torch.fake_quantize_per_tensor_affine, so the two agree on the gradient.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: IntFormat
    ) -> torch.Tensor:
        code = torch.round(_scaled(x, scale)) + expand_scale(zero_point, x).float()
        ctx.save_for_backward((code >= fmt.qmin) & (code <= fmt.qmax))
        return fake_quantize(x, scale, zero_point, fmt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None


def fake_quantize_ste(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: IntFormat
) -> torch.Tensor:
    """fake_quantize with a straight-through gradient for x (scale and zero point are constants)."""
    return _FakeQuantSTE.apply(x, scale, zero_point, fmt)

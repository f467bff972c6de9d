"""AWQ (Lin et al., 2024): activation-aware per-input-channel scales for weight-only quantization.

Weight-only quantization rounds every weight with the same relative care, but the output error of
y = x W^T weighs column j's rounding error by |x_j|: the few input channels with large activations
matter most. Scaling column j up by s_j > 1 before quantizing (and dividing x_j by s_j, folded into
the op that produces x, exactly as SmoothQuant does) gives those columns a finer grid relative to
their size, at the cost of coarser steps for the others in the same group. AWQ searches one
exponent for the whole layer:

    s(alpha) = mean_tokens |x_j| ^ alpha,   alpha in {0, 1/grid, ..., (grid - 1)/grid},

and keeps the alpha whose quantized output is closest to the original one on calibration tokens:

    loss(s) = sum_i mean_tokens || x W_i^T - (x / s) qdq(W_i * s)^T ||^2

over every Linear W_i reading x (q/k/v, gate/up), since one s is folded into their shared input.
alpha = 0 gives s = 1, plain round-to-nearest, and is always tried first: the chosen scales are
never worse than round-to-nearest on the search tokens.

Applying the result: `lowbit.algorithms.smoothquant.scale_weight_inputs` multiplies each W_i by s
before it is quantized, and `fold_into_norm` / `fold_into_linear_output` divide the producer's
output by s. (AWQ's second step, a search for clipped weight ranges, is not part of this module.)
Pure functions over tensors; collecting x for a layer is the glue's job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError

# Quantize-dequantize a whole weight (out, in) float32 with scales of its own (absmax per group,
# say): the caller binds format and granularity.
WeightQDQ = Callable[[torch.Tensor], torch.Tensor]

# Channels whose mean |x| is below this fraction of the largest one are treated as if they had it:
# a dead channel would otherwise get s -> 0 and pull the normalization with it. Bounds the spread
# of s to (1 / _FLOOR) ** alpha, i.e. s within [1e-2, 1e2] after normalization.
_FLOOR = 1e-4

_CHUNK_ROWS = 8192  # tokens per pass when reducing mean |x| over a large calibration set


@dataclass
class AWQResult:
    """The chosen per-input-channel scales and what they achieve on the search tokens."""

    scales: torch.Tensor  # (in,) float32, > 0; multiply weight columns by it, divide x by it
    alpha: float  # the exponent that produced scales (0.0: scales are all 1, round-to-nearest)
    loss: float  # sum over weights of the mean over tokens of the squared output error, float32
    rtn_loss: float  # the same with s = 1 (round-to-nearest with the same qdq); loss <= rtn_loss


def awq_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act_mean ** alpha (in,), float32, normalized so that sqrt(max(s) * min(s)) = 1.

    act_mean: (in,) mean |x_j| over tokens, not all zero. Values below _FLOOR * max are raised to
    it first, so every s_j is finite and positive. The normalization only keeps W * s and x / s in
    a sane range (a per-group absmax quantizer is equivariant to a global factor up to the rounding
    of its scales); alpha = 0 gives exactly 1 everywhere.
    """
    m = act_mean.detach().float()
    m = m.clamp_min(float(m.max()) * _FLOOR)
    s = m.pow(float(alpha))
    return s / (s.max() * s.min()).sqrt()


def awq_loss(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    qdq: WeightQDQ,
    scales: torch.Tensor,
    *,
    reference: Sequence[torch.Tensor] | None = None,
) -> float:
    """sum_i mean_tokens || x W_i^T - (x / s) qdq(W_i * s)^T ||^2 in float32.

    x: (n, in) float32 search tokens; weights: each (out_i, in); scales: (in,).
    reference: the outputs x W_i^T (n, out_i) if already computed (they do not depend on s).
    """
    xs = x / scales  # (n, in)
    total = 0.0
    for i, w in enumerate(weights):
        w32 = w.float()
        y = reference[i] if reference is not None else x @ w32.T  # (n, out_i)
        q = qdq(w32 * scales)  # (out_i, in)
        total += float((y - xs @ q.T).square().sum()) / x.shape[0]
    return total


def _mean_abs(x2: torch.Tensor) -> torch.Tensor:
    """mean |x| over the rows of x2 (n, in), float32, in row chunks so no float32 copy of x is made."""
    acc = torch.zeros(x2.shape[1], dtype=torch.float64, device=x2.device)
    for i in range(0, x2.shape[0], _CHUNK_ROWS):
        acc += x2[i : i + _CHUNK_ROWS].float().abs().sum(dim=0, dtype=torch.float64)
    return (acc / x2.shape[0]).float()


def _search_rows(n: int, max_tokens: int, device: torch.device) -> torch.Tensor:
    """max_tokens evenly spaced row indices out of n (all rows when n <= max_tokens), deterministic."""
    if n <= max_tokens:
        return torch.arange(n, device=device)
    return torch.arange(max_tokens, device=device) * n // max_tokens


def awq_search(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    qdq: WeightQDQ,
    *,
    grid: int = 20,
    max_tokens: int = 4096,
) -> AWQResult:
    """Search alpha in {0, 1/grid, ..., (grid-1)/grid} for the scales s = mean|x|^alpha (normalized)
    that minimize the layer's quantized output error.

    x: (..., in) calibration inputs shared by the weights (leading dims are flattened to tokens).
    weights: each (out_i, in), the Linears that read x.
    qdq: quantize-dequantize of a whole (out, in) float32 weight with its own scales.
    grid: number of candidate exponents (1 means round-to-nearest only).
    max_tokens: the loss is computed on at most this many evenly spaced tokens; mean |x| for the
    scales uses every token.
    Ties keep the smaller alpha, so round-to-nearest wins unless a candidate is strictly better.
    """
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise LowbitError(f"AWQ grid must be an integer >= 1, got {grid!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise LowbitError(f"AWQ max_tokens must be an integer >= 1, got {max_tokens!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be (..., tokens, in), got shape {tuple(x.shape)}")
    if len(weights) == 0:
        raise ValueError("awq_search needs at least one weight reading x")
    in_f = x.shape[-1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != in_f:
            raise ValueError(f"weight of shape {tuple(w.shape)} does not read {in_f} input channels")

    x2 = x.detach().reshape(-1, in_f)  # (n, in)
    if x2.shape[0] == 0:
        raise LowbitError("AWQ got no calibration tokens for this layer")
    act_mean = _mean_abs(x2)  # (in,)
    if not torch.isfinite(act_mean).all():
        raise LowbitError("NaN or Inf in a layer's calibration input: AWQ's scales would be meaningless")
    if not float(act_mean.max()) > 0:
        raise LowbitError("the layer's calibration inputs were all zero: AWQ has nothing to weigh")

    if not all(bool(torch.isfinite(w).all()) for w in weights):
        raise LowbitError("NaN or Inf in a weight given to AWQ")

    xs = x2[_search_rows(x2.shape[0], max_tokens, x2.device)].float()  # (m, in)
    ws = [w.detach().to(xs.device) for w in weights]
    reference = [xs @ w.float().T for w in ws]  # (m, out_i), independent of s

    best_alpha, best_scales, best_loss, rtn_loss = 0.0, torch.ones(in_f, device=xs.device), 0.0, 0.0
    for k in range(grid):
        alpha = k / grid
        s = awq_scales(act_mean, alpha)
        loss = awq_loss(xs, ws, qdq, s, reference=reference)
        if k == 0:
            best_scales, best_loss, rtn_loss = s, loss, loss
        elif loss < best_loss:
            best_alpha, best_scales, best_loss = alpha, s, loss
    return AWQResult(best_scales, best_alpha, best_loss, rtn_loss)

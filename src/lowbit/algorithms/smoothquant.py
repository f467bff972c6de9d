"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before quantizing both.

A Linear computes y = X W^T. For any positive vector s over its input channels,

    X W^T = (X diag(1/s)) (W diag(s))^T,

so dividing input channel j of the activations by s_j and multiplying column j of the weight by
s_j leaves the output unchanged. Activation outliers live in a few channels and are hard to
quantize per tensor or per token; weights are easy. Choosing

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

leaves channel j with activation maximum max|X_j|^(1-alpha) max|W_j|^(1-alpha) and weight column
maximum max|X_j|^alpha max|W_j|^alpha: alpha = 0.5 splits the difficulty evenly, alpha -> 1
pushes all of it into the weights.

The division of X is never done at run time: it is folded into whatever produced X, either the
scale (and bias) of the RMSNorm/LayerNorm in front of q/k/v or gate/up (`fold_into_norm`), or
the output rows of a Linear whose outputs reach these inputs through an operation linear in them
(v_proj -> o_proj through attention, up_proj -> down_proj through act(gate) * up:
`fold_into_linear_output`). Every Linear reading the same X gets its columns scaled by the same
s (`scale_weight_inputs`), which is why `smoothing_factors` takes all of them.

Pure functions over tensors; finding the norms and Linears of a model is the glue's job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lowbit.errors import LowbitError


def smoothing_factors(
    act_absmax: torch.Tensor,
    weights: Sequence[torch.Tensor],
    alpha: float = 0.5,
    *,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Per-input-channel smoothing factors s (in,), float32, in [eps, 1/eps].

    act_absmax: (in,) max |X_j| over the calibration tokens of the Linears' shared input.
    weights: the Linears that read that input, each (..., out_i, in) (leading dims, such as the
    expert dim of a (E, out, in) tensor, are reduced like rows); the weight-side term is the
    maximum |W[o, j]| over all of them, since one s must serve every reader.
    alpha: migration strength in [0, 1]; 0 takes s from the weights only (it flattens the weight
    column maxima to 1), 1 from the activations only (it flattens the activation maxima to 1).

    A channel whose activation maximum or weight maximum is 0 gets s_j = 1: there is nothing to
    balance, and 0^p or 1/0 would put 0 or inf into the fold. The clamp to [eps, 1/eps] keeps
    extreme ratios (a near-dead weight column, say) from producing factors that overflow or
    underflow once the folded weights are cast back to bf16.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"SmoothQuant alpha must be a number in [0, 1], got {alpha!r}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    if act_absmax.dim() != 1:
        raise ValueError(f"act_absmax must be 1-D (in,), got shape {tuple(act_absmax.shape)}")
    if len(weights) == 0:
        raise ValueError("smoothing_factors needs at least one weight reading the activations")
    in_f = act_absmax.shape[0]
    for w in weights:
        if w.dim() < 2 or w.shape[-1] != in_f:
            raise ValueError(f"weight of shape {tuple(w.shape)} does not read {in_f} input channels")

    a = act_absmax.detach().float()
    if not torch.isfinite(a).all():
        raise LowbitError(
            "NaN or Inf in the activation maxima: the calibration data overflowed or was corrupt"
        )
    if bool((a < 0).any()):
        raise ValueError("act_absmax holds negative values; it must be max |X| per channel")

    w_max = torch.stack(
        [w.detach().abs().float().reshape(-1, in_f).amax(dim=0).to(a.device) for w in weights]
    ).amax(dim=0)  # (in,)
    if not torch.isfinite(w_max).all():
        raise LowbitError("NaN or Inf in a weight to be smoothed")

    alpha = float(alpha)
    s = a.pow(alpha) / w_max.pow(1.0 - alpha)  # (in,); inf/nan only where a or w_max is 0
    s = torch.where((a > 0) & (w_max > 0), s, torch.ones_like(s))
    return s.clamp(eps, 1.0 / eps)


def _check_factors(s: torch.Tensor, n: int, what: str) -> None:
    if s.dim() != 1 or s.shape[0] != n:
        raise ValueError(
            f"smoothing factors of shape {tuple(s.shape)} do not match the {n} channels of {what}"
        )


def _check_vector(t: torch.Tensor, s: torch.Tensor, what: str) -> None:
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D (in,), got shape {tuple(t.shape)}")
    _check_factors(s, t.shape[0], what)


def _divide(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """t / s (s already shaped to broadcast against t), computed in at least float32 and rounded
    once to t's dtype."""
    dt = torch.promote_types(t.dtype, torch.float32)
    return (t.to(dt) / s.to(device=t.device, dtype=dt)).to(t.dtype)


def fold_into_norm(norm_weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The norm's scale (in,) divided by s (in,), in the norm's dtype: the norm now emits X / s.

    norm_weight must be the multiplier the norm actually applies; a norm that computes
    x * (1 + weight) (Gemma) needs (1 + weight) / s - 1 instead, which is the caller's to form.
    """
    _check_vector(norm_weight, s, "the norm weight")
    return _divide(norm_weight, s)


def fold_into_norm_bias(norm_bias: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A LayerNorm's bias (in,) divided by s (in,): needed as well, since the bias is added after
    the scale and is part of X."""
    _check_vector(norm_bias, s, "the norm bias")
    return _divide(norm_bias, s)


def fold_into_linear_output(
    weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of the producing Linear's weight (in, k) and its bias (in,) divided by s (in,).

    For a Linear whose output channel j becomes input channel j of the smoothed Linears through
    an operation linear in it: up_proj before down_proj (act(gate) * up), v_proj before o_proj
    (attention mixes tokens, not channels). With grouped-query attention v_proj has fewer output
    channels than o_proj has inputs; s must then be equal across the query heads that share a kv
    head and be given here at v_proj's size. Returns (weight, bias) in their own dtypes.
    """
    if weight.dim() != 2:
        raise ValueError(f"the producing Linear's weight must be 2-D (in, k), got {tuple(weight.shape)}")
    _check_factors(s, weight.shape[0], "the producing Linear's output")
    new_w = _divide(weight, s.unsqueeze(1))
    if bias is None:
        return new_w, None
    _check_vector(bias, s, "the producing Linear's bias")
    return new_w, _divide(bias, s)


def scale_weight_inputs(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """weight (..., out, in) with column j multiplied by s_j (in,), in the weight's dtype."""
    if weight.dim() < 2:
        raise ValueError(f"weight must be at least 2-D (..., out, in), got {tuple(weight.shape)}")
    _check_factors(s, weight.shape[-1], "the weight's inputs")
    dt = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(dt) * s.to(device=weight.device, dtype=dt)).to(weight.dtype)


def activation_spread(act_absmax: torch.Tensor) -> float:
    """max / median of the per-channel activation maxima: how much the outlier channels dominate
    (1 for perfectly flat maxima). A diagnostic for reports and tests."""
    a = act_absmax.detach().float()
    med = float(a.median())
    return float(a.max()) / med if med > 0 else math.inf

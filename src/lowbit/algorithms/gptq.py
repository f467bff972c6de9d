"""GPTQ (Frantar et al., 2023): round weights column by column, pushing each column's rounding error
onto the columns not yet rounded, weighted by the inverse Hessian of the layer's squared output error.

Pure functions over tensors; the glue that gathers Hessians from calibration data is in
`lowbit.algorithms.sequential`. Any grid lowbit has works, because the grid enters only through
`fake_quantize(w, scale, fmt)` with the layer's own scales:

* per channel (FP8 E4M3, INT8): one scale per output row, fixed before the sweep (from the
  original weight, MSE-searched like round-to-nearest), so the sweep only chooses codes;
* per group (INT4 with groups of 64 or 128): a group's scales are computed when the sweep reaches
  its first column, from the weights as updated so far (the original algorithm), or up front from
  the original weight when columns are visited out of order (`actorder`, as llm-compressor's
  "weight" activation ordering does, so no group index has to be stored).

For a layer y = x W^T over calibration inputs X (n, in), the objective is ||X W^T - X Q^T||^2;
its Hessian with respect to each row of W is H = 2 X^T X / n. `hessian_update` accumulates it in
float32 as a running mean, so it does not depend on how tokens are batched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats import IntFormat, Minifloat, fake_quantize

# A function from a weight block (out, k) and its scales to the block on the grid (same shape).
QDQ = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class HessianState:
    """Running H = 2/n sum x x^T over n tokens, float32 (in, in)."""

    h: torch.Tensor
    n: int = 0


def hessian_init(in_features: int, device: torch.device | str | None = None) -> HessianState:
    return HessianState(torch.zeros(in_features, in_features, dtype=torch.float32, device=device))


def hessian_update(state: HessianState, x: torch.Tensor) -> None:
    """Fold the tokens of x (..., in) into the running Hessian (a mean, so batch-size independent)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    m = x2.shape[0]
    if m == 0:
        return
    if not torch.isfinite(x2).all():
        raise LowbitError("NaN or Inf in a layer's calibration input: the Hessian would be meaningless")
    total = state.n + m
    state.h.mul_(state.n / total)
    state.h.addmm_(x2.t(), x2, alpha=2.0 / total)
    state.n = total


@dataclass
class GPTQResult:
    weight: torch.Tensor  # (out, in) on the grid, float32 (dequantized)
    scale: torch.Tensor  # (out, 1) or (out, in / group)
    error: float  # the objective's value: tr((W - Q) H (W - Q)^T) / out
    rtn_error: float  # the same for round-to-nearest with the same scales, for comparison
    damp: float  # the relative dampening that made H positive definite


def _inverse_cholesky(h: torch.Tensor, damp: float, *, retries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 after adding damp * mean(diag H) to the diagonal; the damping
    grows tenfold on failure (an ill-conditioned H) up to `retries` times, then the layer is refused."""
    mean_diag = float(torch.diag(h).mean())
    if not mean_diag > 0:
        raise LowbitError("the layer's Hessian is zero: its calibration inputs were all zero")
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    tried = damp
    for _ in range(retries + 1):
        try:
            L = torch.linalg.cholesky(h + damp * mean_diag * eye)
            hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(hinv, upper=True), damp
        except torch.linalg.LinAlgError:
            tried, damp = damp, damp * 10 if damp > 0 else 1e-4
    raise LowbitError(f"the Hessian stayed singular with dampening up to {tried:g}: the calibration inputs are degenerate")


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    qdq: QDQ,
    scale_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    group_size: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    actorder: bool = False,
) -> GPTQResult:
    """GPTQ on one weight matrix.

    w: (out, in) original weight; h: (in, in) Hessian (`hessian_update`).
    scale_fn(w_part) -> scales for a (out, k) slice: (out, 1) for the whole matrix or one group.
    qdq(w_part, scale) -> w_part on the grid.
    group_size: None for one scale per row (computed once from the original w), else columns per
    group (scales computed as the sweep reaches each group, or up front with `actorder`).
    actorder: visit columns by decreasing Hessian diagonal (largest input energy first).
    """
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"weight {tuple(w.shape)} and Hessian {tuple(h.shape)} do not match")
    out_f, in_f = w.shape
    if group_size is not None and (group_size <= 0 or in_f % group_size):
        raise LowbitError(f"group size {group_size} does not divide the input dimension {in_f}")
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that never fire: any value is exact there
    if bool(dead.all()):
        raise LowbitError("the layer's Hessian is zero: its calibration inputs were all zero")
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    if group_size is not None:  # a group never straddles two blocks
        block_size = max(group_size, block_size // group_size * group_size)
    n_groups = in_f // group_size if group_size else 1
    if group_size is None:
        scale = scale_fn(w.float())  # (out, 1)
    elif actorder:
        scale = torch.cat([scale_fn(w.float()[:, g * group_size : (g + 1) * group_size]) for g in range(n_groups)], 1)
    else:
        scale = torch.empty(out_f, n_groups, dtype=torch.float32, device=w.device)

    perm = torch.argsort(torch.diag(H), descending=True) if actorder else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    hinv, used_damp = _inverse_cholesky(H, damp)

    def col_scale(j: int) -> torch.Tensor:
        """Scale column j (in the visiting order) uses: (out, 1)."""
        if group_size is None:
            return scale
        g = (int(perm[j]) if perm is not None else j) // group_size
        return scale[:, g : g + 1]

    Q = torch.zeros_like(W)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if group_size is not None and not actorder and j % group_size == 0:
                # the group's scales from its weights as updated by the error of earlier columns
                scale[:, j // group_size : j // group_size + 1] = scale_fn(W1[:, i : i + group_size])
            col = W1[:, i : i + 1]
            q = qdq(col, col_scale(j))
            Q[:, j : j + 1] = q
            err = (col - q) / hinv1[i, i]
            W1[:, i:] -= err @ hinv1[i : i + 1, i:]
            E1[:, i : i + 1] = err
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]

    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
    if not torch.isfinite(Q).all():
        raise LowbitError("GPTQ produced non-finite weights; refusing to write them")
    w0 = w.detach().float()
    rtn = _rtn(w0, scale, qdq, group_size)
    return GPTQResult(Q, scale, _objective(w0 - Q, h), _objective(w0 - rtn, h), used_damp)


def column_qdq(fmt: Any) -> QDQ:
    """A quantize-dequantize for GPTQ's column sweep: the same grid as `lowbit.formats.fake_quantize`
    without its per-call validation (NaN counts, scale checks), which forces a device sync on every
    column of a GPU sweep. Safe here: weights are checked finite before the sweep and scales come
    from `weight_scale` (finite, >= MIN_SCALE). Formats torch cannot cast exactly take the general path."""
    if isinstance(fmt, IntFormat):
        lo, hi = float(fmt.qmin), float(fmt.qmax)
        return lambda w, s: torch.clamp(torch.round(w / s), lo, hi) * s
    dt = getattr(fmt, "dtype", None)
    if isinstance(fmt, Minifloat) and dt is not None and fmt.torch_rounds:
        m = fmt.max
        return lambda w, s: (w / s).clamp(-m, m).to(dt).float() * s
    return lambda w, s: fake_quantize(w, s, fmt)


def _rtn(w: torch.Tensor, scale: torch.Tensor, qdq: QDQ, group_size: int | None) -> torch.Tensor:
    if group_size is None:
        return qdq(w, scale)
    g = w.unflatten(1, (-1, group_size))  # (out, G, gs)
    return qdq(g, scale.unsqueeze(-1)).flatten(1)


def _objective(d: torch.Tensor, h: torch.Tensor) -> float:
    """tr(D H D^T) / out: the mean over output rows of the squared output error per token."""
    return float(((d @ h.float()) * d).sum() / d.shape[0])

"""Where scales live: one per tensor, per output channel, per token, or per group.

Every reduction keeps dims, so the result broadcasts against the input. Leading dims beyond the
last two of a weight (e.g. the expert dim of a (E, out, in) tensor) are always kept: each expert
gets scales of its own.
"""

from __future__ import annotations

from typing import Literal

import torch

Strategy = Literal["tensor", "channel", "token", "group"]


def absmax(x: torch.Tensor, strategy: Strategy, *, matrix_dims: int = 2, group_size: int | None = None) -> torch.Tensor:
    """max |x| reduced according to `strategy`, keepdim, float32.

    x: weights (..., out, in) with `matrix_dims=2`, or activations (..., T, C) with any leading
    dims for "token"; "tensor" reduces over the last `matrix_dims` dims (use x.dim() for a whole
    activation tensor); "channel"/"token" over the last dim; "group" over runs of `group_size`
    along the last dim, giving (..., in / group_size).
    """
    a = x.detach().abs().float()
    if strategy == "tensor":
        dims = tuple(range(x.dim() - matrix_dims, x.dim()))
        return a.amax(dim=dims, keepdim=True)
    if strategy in ("channel", "token"):
        return a.amax(dim=-1, keepdim=True)
    if strategy == "group":
        if not group_size or x.shape[-1] % group_size:
            raise ValueError(f"group size {group_size} does not divide the last dimension {x.shape[-1]}")
        return a.unflatten(-1, (x.shape[-1] // group_size, group_size)).amax(dim=-1)
    raise ValueError(f"unknown strategy {strategy!r}")

"""What an algorithm needs from the processes it runs on: reductions of statistics and the sharing of
results. One process (`LOCAL`) makes every call a no-op, so the layer code is the same for one rank
or many (`lowbit.runtime.distributed.TorchCollective` runs the calls on torch.distributed).

Kept free of torch.distributed so that `lowbit.algorithms` can import it at no cost.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

ReduceOp = Literal["sum", "max", "min"]


class Collective(Protocol):
    """rank in [0, world); every call is made by every rank in the same order (a collective)."""

    rank: int
    world: int

    def all_reduce(self, t: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        """Reduce `t` over the ranks in place; returns it."""
        ...

    def reduce_sum(self, t: torch.Tensor, dst: int) -> torch.Tensor:
        """Sum `t` over the ranks into rank `dst`'s copy (the others' are left undefined); returns it."""
        ...

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite every rank's `t` with rank `src`'s, in place; returns it."""
        ...

    def barrier(self) -> None: ...


class SingleProcess:
    """The collective of one process: every reduction is the identity."""

    rank = 0
    world = 1

    def all_reduce(self, t: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        return t

    def reduce_sum(self, t: torch.Tensor, dst: int) -> torch.Tensor:
        return t

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        return None


LOCAL: Collective = SingleProcess()


def owner(index: int, world: int) -> int:
    """The rank that solves the `index`-th module of a layer (round-robin)."""
    return index % world

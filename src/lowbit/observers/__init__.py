"""Observers: watch a tensor stream during calibration and say what range it covers.

An observer keeps float32 running statistics and gives `amax()` (the magnitude a symmetric
scale must cover). Statistics are per tensor here (static input scales); min-max state reduces
exactly across processes with an all-reduce of max/min, which later distributed calibration uses.
"""

from __future__ import annotations

import abc

import torch

from lowbit.errors import LowbitError


class Observer(abc.ABC):
    """Base: counts tokens and refuses non-finite values, naming the module that produced them."""

    name = "base"

    def __init__(self, where: str = "") -> None:
        self.where = where
        self.tokens = 0
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """x: (T, C) tokens of one sample (padding already removed)."""
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.detach().float())
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise LowbitError(
                f"NaN or Inf in the input of {self.where or 'a layer'} during calibration; "
                "the model or the data produce non-finite activations"
            )
        self.tokens += x.shape[0] if x.dim() > 1 else 1
        self._combine(lo, hi)

    @abc.abstractmethod
    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Fold one sample's (min, max) into the running state."""

    def amax(self) -> torch.Tensor:
        if self.min_val is None or self.max_val is None:
            raise LowbitError(f"{self.where or 'a layer'} saw no calibration token")
        return torch.maximum(self.min_val.abs(), self.max_val.abs())


class MinMaxObserver(Observer):
    """Running min and max over everything seen: the range of the calibration set."""

    name = "minmax"

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each sample's min and max (less sensitive to one outlier sample).

    Updated once per calibration sample, so the result does not depend on the batch size.
    """

    name = "moving-minmax"

    def __init__(self, where: str = "", averaging_constant: float = 0.01) -> None:
        super().__init__(where)
        self.c = averaging_constant

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.c * (lo - self.min_val)
            self.max_val = self.max_val + self.c * (hi - self.max_val)


def make_observer(name: str, where: str = "") -> Observer:
    if name == "minmax":
        return MinMaxObserver(where)
    if name == "moving-minmax":
        return MovingAverageMinMaxObserver(where)
    raise LowbitError(f"unknown observer {name!r}; choose minmax or moving-minmax")

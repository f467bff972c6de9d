"""Observers: watch a tensor stream during calibration and say what range it covers.

An observer keeps float32 running statistics and gives `amax()` (the magnitude a symmetric
scale must cover). Statistics are per tensor here (static input scales); min-max state reduces
exactly across processes with an all-reduce of max/min, which later distributed calibration uses.
"""

from __future__ import annotations

import abc
import math

import torch

from lowbit.errors import LowbitError
from lowbit.formats.float8 import E4M3, ScaledFormat


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


class HistogramObserver(MinMaxObserver):
    """A histogram of |x| over fixed log-spaced bins (1e-10 to 1e10, 4096 bins: 1.1% wide), plus the
    exact min and max: batch-size independent, and mergeable across processes by summing counts.

    - "percentile" (p = 99.99 by default): amax is the |x| below which p% of the values lie (the
      upper edge of that bin), never above the true max. Clips the rare outliers.
    - "mse": amax is the one, among amax x [0.30, 0.32, ..., 1.00], whose scale minimizes the
      expected squared quantization error of the histogram's values on `fmt`'s grid (each bin
      represented by its geometric centre). For a minifloat, shrinking rarely pays: its relative
      step is the same in every binade; for an integer grid it trades clipped outliers for a finer step.
    """

    BINS = 4096
    EDGES = torch.logspace(-10, 10, BINS + 1)

    def __init__(self, where: str = "", *, mode: str, fmt: ScaledFormat | None = None, percentile: float = 99.99) -> None:
        super().__init__(where)
        self.name = mode
        self.mode, self.percentile = mode, percentile
        self.fmt = fmt if fmt is not None else E4M3
        self.counts = torch.zeros(self.BINS, dtype=torch.float64)  # bin k: EDGES[k] <= |x| < EDGES[k + 1]

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        if x.numel():  # equal bins in log10 |x| (zeros land in the first bin, near 1e-10)
            lg = torch.log10(x.detach().float().abs().clamp_min(1e-10))
            self.counts += torch.histc(lg, bins=self.BINS, min=-10, max=10).double().cpu()

    def amax(self) -> torch.Tensor:
        top = super().amax()
        total = float(self.counts.sum())
        if self.mode == "percentile":
            cum = torch.cumsum(self.counts, 0)
            b = int(torch.searchsorted(cum, torch.tensor(total * self.percentile / 100, dtype=torch.float64)))
            edge = self.EDGES[min(b + 1, self.BINS)]
            return torch.minimum(edge.to(top.dtype), top)
        centres = (self.EDGES[:-1] * self.EDGES[1:]).sqrt()
        keep = self.counts > 0
        vals, w = centres[keep].double(), self.counts[keep]
        vals = torch.minimum(vals, top.double())  # the top bin's centre must not lie above the true max
        best, best_err = top, math.inf
        for f in torch.linspace(0.30, 1.0, 36).tolist():
            amax = top * f
            s = (amax.double() / self.fmt.max).clamp_min(1e-30)
            err = float((w * (self.fmt.quantize_dequantize((vals / s).float()).double() * s - vals) ** 2).sum())
            if err < best_err:
                best, best_err = amax, err
        return best


def make_observer(name: str, where: str = "", fmt: ScaledFormat | None = None) -> Observer:
    """minmax | moving-minmax | percentile (99.99) | mse; `fmt`: the activations' format (for mse)."""
    if name == "minmax":
        return MinMaxObserver(where)
    if name == "moving-minmax":
        return MovingAverageMinMaxObserver(where)
    if name in ("percentile", "mse"):
        return HistogramObserver(where, mode=name, fmt=fmt)
    raise LowbitError(f"unknown observer {name!r}; choose minmax, moving-minmax, percentile or mse")

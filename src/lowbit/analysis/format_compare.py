"""`lowbit formats compare`: which number format fits each Linear layer of a real model.

For every Linear layer: outlier statistics of its weight and of its calibration-time input
(max/std, excess kurtosis, fraction of values beyond 3 and 6 standard deviations) and the SQNR
(dB) that each candidate format gives on them:

- 8-bit candidates (E5M2, E4M3FN, E3M4, INT8) the way lowbit's W8A8 schemes use them: weights with
  one scale per output channel (absmax), activations with one static scale per tensor calibrated
  on the same data (absmax over all calibration tokens), as the `fp8` scheme stores it;
- 4-bit block formats (MXFP4, NVFP4) with their own block scales along the input dimension, for
  weights and (per token) activations.

The recommendation follows Kuzmin et al., "FP8 Quantization: The Power of the Exponent" (2022):
the best format depends on the outliers: with light tails (kurtosis near a Gaussian's) a uniform
grid (INT8) or more mantissa bits (E3M4) wins, with heavy tails more exponent bits (E4M3, E5M2)
do. lowbit measures rather than predicts: per layer and tensor the 8-bit candidate with the highest
SQNR is recommended, and the report checks the paper's finding on this model by showing the mean
kurtosis of the layers each format wins.

Activations take two passes over the calibration samples: the first collects range and moments
(so the static per-tensor scale is known), the second counts outliers and quantization error.
Statistics are accumulated in float64; nothing but per-layer sums is kept in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lowbit.errors import LowbitError
from lowbit.formats.block import MXFP4, NVFP4, block_fake_quantize
from lowbit.formats.integer import INT8
from lowbit.formats.integer import fake_quantize as int_fake_quantize
from lowbit.formats.minifloat import E3M4, E4M3FN, E5M2, Minifloat

EIGHT_BIT = ("e5m2", "e4m3fn", "e3m4", "int8")
FOUR_BIT = ("mxfp4", "nvfp4")
CANDIDATES = EIGHT_BIT + FOUR_BIT
_FLOATS: dict[str, Minifloat] = {"e5m2": E5M2, "e4m3fn": E4M3FN, "e3m4": E3M4}
_TINY = 1e-30


def _scaled_qdq(name: str, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize x (float32) with scale amax / (format max); amax broadcasts against x."""
    amax = amax.clamp_min(_TINY)
    if name == "int8":
        scale = amax / INT8.qmax
        return int_fake_quantize(x, scale, torch.zeros((), dtype=torch.int32), INT8)
    fmt = _FLOATS[name]
    return fmt.quantize_dequantize(x, amax / fmt.max)


def qdq_weight(name: str, w: torch.Tensor) -> torch.Tensor:
    """A weight (out, in) as the candidate stores it: per output channel for 8-bit, blocks along `in` for 4-bit."""
    if name in FOUR_BIT:
        return block_fake_quantize(w, MXFP4 if name == "mxfp4" else NVFP4, pad=True)
    return _scaled_qdq(name, w, w.abs().amax(dim=-1, keepdim=True))


def qdq_activation(name: str, x: torch.Tensor, static_amax: float) -> torch.Tensor:
    """Activations (T, C): static per-tensor scale for 8-bit candidates, per-token blocks for 4-bit ones."""
    if name in FOUR_BIT:
        return block_fake_quantize(x, MXFP4 if name == "mxfp4" else NVFP4, pad=True)
    return _scaled_qdq(name, x, torch.tensor(static_amax))


@dataclass
class Moments:
    """Streaming float64 sums of x, x^2, x^3, x^4 and the range; outlier counts need mean and std first."""

    n: int = 0
    s1: float = 0.0
    s2: float = 0.0
    s3: float = 0.0
    s4: float = 0.0
    amax: float = 0.0
    beyond3: int = 0
    beyond6: int = 0

    def update(self, x: torch.Tensor) -> None:
        d = x.double()
        d2 = d * d
        self.n += d.numel()
        self.s1 += float(d.sum())
        self.s2 += float(d2.sum())
        self.s3 += float((d2 * d).sum())
        self.s4 += float((d2 * d2).sum())
        self.amax = max(self.amax, float(d.abs().max()))

    @property
    def mean(self) -> float:
        return self.s1 / max(self.n, 1)

    @property
    def std(self) -> float:
        m = self.mean
        return math.sqrt(max(self.s2 / max(self.n, 1) - m * m, 0.0))

    @property
    def excess_kurtosis(self) -> float:
        """E[(x - mu)^4] / sigma^4 - 3: 0 for a Gaussian, -1.2 for a uniform, large for heavy tails."""
        n = max(self.n, 1)
        m, e2, e3, e4 = self.mean, self.s2 / n, self.s3 / n, self.s4 / n
        c4 = e4 - 4 * m * e3 + 6 * m * m * e2 - 3 * m**4
        var = self.std**2
        return c4 / (var * var) - 3 if var > 0 else math.nan

    def count_outliers(self, x: torch.Tensor) -> None:
        dev = (x.double() - self.mean).abs()
        s = self.std
        self.beyond3 += int((dev > 3 * s).sum())
        self.beyond6 += int((dev > 6 * s).sum())

    def summary(self) -> dict[str, float]:
        return {
            "numel": self.n,
            "mean": self.mean,
            "std": self.std,
            "absmax": self.amax,
            "max_over_std": self.amax / self.std if self.std > 0 else math.inf,
            "excess_kurtosis": self.excess_kurtosis,
            "beyond_3sigma": self.beyond3 / max(self.n, 1),
            "beyond_6sigma": self.beyond6 / max(self.n, 1),
        }


@dataclass
class ErrorSums:
    signal: float = 0.0
    noise: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CANDIDATES, 0.0))

    def update(self, x: torch.Tensor, qdq: Callable[[str], torch.Tensor]) -> None:
        xd = x.double()
        self.signal += float((xd * xd).sum())
        for name in CANDIDATES:
            self.noise[name] += float((qdq(name).double() - xd).square().sum())

    def sqnr_db(self) -> dict[str, float]:
        return {
            k: (10 * math.log10(self.signal / v) if v > 0 else math.inf) if self.signal > 0 else math.nan
            for k, v in self.noise.items()
        }


def _best(sqnr: dict[str, float], among: tuple[str, ...]) -> str:
    return max(among, key=lambda k: (sqnr[k], -among.index(k)))


def _layer_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def compare_formats(
    model: nn.Module, samples: list[torch.Tensor], *, targets: list[str], progress: bool = True
) -> dict[str, Any]:
    """Per-layer statistics, SQNR per candidate format, and a recommendation; see the module docstring.

    samples: 1-D token id tensors (run one at a time, so no padding enters the statistics).
    targets: names of the nn.Linear modules to analyse.
    """
    linears = {n: m for n, m in model.named_modules() if n in set(targets)}
    if not linears:
        raise LowbitError("no Linear layers to compare")
    device = next(model.parameters()).device
    moments = {n: Moments() for n in linears}
    errors = {n: ErrorSums() for n in linears}
    phase: dict[str, int] = {"pass": 1}

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (T, C)
            if phase["pass"] == 1:
                moments[name].update(x)
            else:
                moments[name].count_outliers(x)
                amax = moments[name].amax
                errors[name].update(x, lambda fmt: qdq_activation(fmt, x, amax))

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for p in (1, 2):
                phase["pass"] = p
                desc = "activation ranges" if p == 1 else "activation errors"
                for s in tqdm(samples, desc=desc, unit="sample", disable=not progress):
                    model(input_ids=s[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    layers = []
    for n, m in tqdm(linears.items(), desc="weights", unit="layer", disable=not progress):
        w = m.weight.detach().float()
        wm = Moments()
        wm.update(w)
        wm.count_outliers(w)
        we = ErrorSums()
        we.update(w, lambda fmt, w=w: qdq_weight(fmt, w))  # type: ignore[misc]
        w_sqnr, a_sqnr = we.sqnr_db(), errors[n].sqnr_db()
        layers.append(
            {
                "name": n,
                "kind": _layer_kind(n),
                "shape": list(w.shape),
                "weight": {**wm.summary(), "sqnr_db": w_sqnr},
                "input": {**moments[n].summary(), "sqnr_db": a_sqnr},
                "recommend": {
                    "weight": _best(w_sqnr, EIGHT_BIT),
                    "input": _best(a_sqnr, EIGHT_BIT),
                    "weight_4bit": _best(w_sqnr, FOUR_BIT),
                },
            }
        )
    return {"layers": layers, "finding": kurtosis_by_winner(layers), "candidates": list(CANDIDATES)}


def kurtosis_by_winner(layers: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """For weights and inputs: per winning 8-bit format, how many tensors it won and their median kurtosis.

    Kuzmin et al.'s finding holds on this model when the median kurtosis rises with the winner's
    exponent bits (INT8 < E3M4 < E4M3 < E5M2).
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for which in ("weight", "input"):
        groups: dict[str, list[float]] = {}
        for layer in layers:
            groups.setdefault(layer["recommend"][which], []).append(layer[which]["excess_kurtosis"])
        out[which] = {
            k: {"tensors": len(v), "median_excess_kurtosis": float(torch.tensor(v).median())}
            for k, v in sorted(groups.items(), key=lambda kv: EIGHT_BIT.index(kv[0]))
        }
    return out


def by_kind(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per projection kind (q_proj, ..., down_proj): median statistics and SQNR over depth, and the winners' counts."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for layer in layers:
        kinds.setdefault(layer["kind"], []).append(layer)
    rows = []
    for kind, group in kinds.items():
        row: dict[str, Any] = {"kind": kind, "layers": len(group)}
        for which in ("weight", "input"):
            row[which] = {
                "median_excess_kurtosis": float(torch.tensor([g[which]["excess_kurtosis"] for g in group]).median()),
                "median_max_over_std": float(torch.tensor([g[which]["max_over_std"] for g in group]).median()),
                "sqnr_db": {
                    c: float(torch.tensor([g[which]["sqnr_db"][c] for g in group]).median()) for c in CANDIDATES
                },
                "winners": _count(g["recommend"][which] for g in group),
            }
        rows.append(row)
    return rows


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out

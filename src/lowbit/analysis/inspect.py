"""`lowbit inspect`: where the quantization error comes from, and whether the calibration data fits.

Three passes over the original model, with hooks on every targeted Linear:

1. calibration samples: per layer the input range (min, max, percentiles from a random subsample,
   per-channel absmax, a histogram of |x|), the clipping rate of the static input scale, and the
   SQNR of the layer's output alone with quantized weights, with quantized inputs and with both
   (y = x W^T in float32 against x Q(W)^T, Q(x) W^T and Q(x) Q(W)^T);
2. the use data (optional): how much of it falls outside the range calibrated on (1), per layer
   and per channel, and a verdict;
3. attribution windows: the KL each layer causes alone (`lowbit.analysis.attribution`).

The quantized layers (scales calibrated exactly as `lowbit quantize` does) come from a copy of the
model, so what is measured is what the checkpoint would hold.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit import __version__
from lowbit.algorithms.ptq import quantize_model
from lowbit.analysis.attribution import attribute_kl
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear
from lowbit.scheme import Scheme

HIST_EDGES = torch.logspace(-6, 4, 81)  # |x| from 1e-6 to 1e4, 8 bins per decade
_SAMPLE_PER_BATCH = 4096
_SAMPLE_CAP = 200_000
PERCENTILES = {"p0.1": 0.001, "p1": 0.01, "p50": 0.5, "p99": 0.99, "p99.9": 0.999}

# Coverage verdict. A use-data activation beyond its channel's calibrated absmax is outside what
# calibration saw. If use data came from the calibration distribution, a value would exceed the
# max of n calibration tokens with probability 1/(n+1), so `channel_excess_ratio` (the observed
# fraction times n+1) is about 1 for representative data and grows with the shift. A layer is
# flagged above EXCESS_FLAG; the set is unrepresentative when more than LAYERS_FLAG of the layers
# are. Measured on smollm2-135m in bench/coverage.py (BENCHMARKS.md).
EXCESS_FLAG = 4.0
LAYERS_FLAG = 0.25


@dataclass
class _LayerStats:
    name: str
    n: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    channel_absmax: torch.Tensor | None = None
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(len(HIST_EDGES) + 1, dtype=torch.long))
    sample: list[torch.Tensor] = field(default_factory=list)
    sampled: int = 0
    clipped: int = 0
    energy: dict[str, float] = field(default_factory=lambda: {"ref": 0.0, "weights": 0.0, "inputs": 0.0, "both": 0.0})
    # use data
    use_n: int = 0
    use_outside: int = 0
    use_outside_channel: int = 0
    use_absmax: float = 0.0
    use_channel_absmax: torch.Tensor | None = None

    def observe(self, x: torch.Tensor, gen: torch.Generator) -> None:
        a = x.abs()
        self.n += x.numel()
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        cm = a.amax(dim=0)
        self.channel_absmax = cm if self.channel_absmax is None else torch.maximum(self.channel_absmax, cm)
        # bucket 0: |x| < 1e-6 (zeros included); bucket k: edges[k-1] <= |x| < edges[k]; last: beyond 1e4
        self.hist += torch.bucketize(a.flatten(), HIST_EDGES, right=True).bincount(minlength=len(HIST_EDGES) + 1)
        if self.sampled < _SAMPLE_CAP:
            flat = x.flatten()
            idx = torch.randint(0, flat.numel(), (min(_SAMPLE_PER_BATCH, flat.numel()),), generator=gen)
            self.sample.append(flat[idx])
            self.sampled += idx.numel()

    def observe_use(self, x: torch.Tensor, absmax: float, channel_absmax: torch.Tensor) -> None:
        a = x.abs()
        self.use_n += x.numel()
        self.use_outside += int((a > absmax).sum())
        self.use_outside_channel += int((a > channel_absmax).sum())
        self.use_absmax = max(self.use_absmax, float(a.max()))
        cm = a.amax(dim=0)
        self.use_channel_absmax = cm if self.use_channel_absmax is None else torch.maximum(self.use_channel_absmax, cm)


def _db(ref: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(ref / noise) if ref > 0 else -math.inf


def _run_hooked(
    model: nn.Module,
    names: Iterable[str],
    make_hook: Callable[[str], Callable[[nn.Module, tuple[torch.Tensor, ...]], None]],
    samples: list[torch.Tensor] | torch.Tensor,
    desc: str,
    progress: bool,
) -> None:
    """Run the samples one at a time through `model` with `make_hook(name)` as a pre-hook on each named module."""
    handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        for s in tqdm(list(samples), desc=desc, unit="sample", disable=not progress):
            model(input_ids=s[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def verdict(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Does the calibration set represent the use data? From each layer's per-channel excess ratio."""
    ex = sorted(layer["coverage"]["channel_excess_ratio"] for layer in layers)
    flagged = [layer for layer in layers if layer["coverage"]["channel_excess_ratio"] > EXCESS_FLAG]
    worst = sorted(layers, key=lambda layer: -layer["coverage"]["channel_excess_ratio"])[:5]
    represents = len(flagged) <= LAYERS_FLAG * len(layers)
    median, p90 = ex[len(ex) // 2], ex[min(len(ex) - 1, int(0.9 * len(ex)))]
    if represents:
        text = (
            f"OK: the calibration set covers the use data: use inputs exceed the calibrated per-channel ranges "
            f"{median:.1f}x as often as same-distribution text would (median over layers; {len(flagged)} of "
            f"{len(layers)} layers above {EXCESS_FLAG:g}x)"
        )
    else:
        text = (
            f"NOT REPRESENTATIVE: use inputs exceed the calibrated per-channel ranges {median:.1f}x as often as "
            f"same-distribution text would (median over layers; {len(flagged)} of {len(layers)} layers above "
            f"{EXCESS_FLAG:g}x); calibrate on text like the use data"
        )
    outside = sorted(layer["coverage"]["outside_fraction"] for layer in layers)
    return {
        "verdict": text,
        "represents": represents,
        "median_excess": median,
        "p90_excess": p90,
        "median_outside": outside[len(outside) // 2],
        "p90_outside": outside[min(len(outside) - 1, int(0.9 * len(outside)))],
        "layers_flagged": len(flagged),
        "worst": [w["name"] for w in worst],
    }


@torch.inference_mode()
def inspect_model(
    model: nn.Module,
    scheme: Scheme,
    calib_samples: list[torch.Tensor],
    *,
    attribution_windows: torch.Tensor | None,
    use_windows: torch.Tensor | None = None,
    ignore: tuple[str, ...] | list[str] = (),
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Every number of the report (see lowbit.analysis.inspect_report for its layout)."""
    if not calib_samples:
        raise LowbitError("inspect needs calibration samples")
    quantized = copy.deepcopy(model)
    rep = quantize_model(quantized, scheme, calib_samples, ignore=ignore, progress=progress)
    qmods = {n: quantized.get_submodule(n) for n in rep.targets}
    stats = {n: _LayerStats(n) for n in rep.targets}
    gen = torch.Generator().manual_seed(seed)
    qw = {n: m.dequantized_weight(torch.float32) for n, m in qmods.items() if isinstance(m, QuantLinear)}

    def calib_hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        qm = qmods[name]
        assert isinstance(qm, QuantLinear)

        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (T, C)
            st = stats[name]
            st.observe(x.cpu(), gen)
            w = cast(torch.Tensor, mod.weight).float()
            xq = qm.quantize_input(args[0]).reshape(-1, x.shape[-1]).float()
            if qm.input_scale is not None:
                limit = float(qm.input_scale.float()) * qm.input_args.format.max  # type: ignore[union-attr]
                st.clipped += int((x.abs() > limit).sum())
            y = F.linear(x, w)
            e = st.energy
            e["ref"] += float(y.double().square().sum())
            e["weights"] += float((F.linear(x, qw[name]) - y).double().square().sum())
            e["inputs"] += float((F.linear(xq, w) - y).double().square().sum())
            e["both"] += float((F.linear(xq, qw[name]) - y).double().square().sum())

        return fn

    _run_hooked(model, stats, calib_hook, calib_samples, "layer statistics", progress)

    if use_windows is not None:
        absmax = {n: max(abs(s.lo), abs(s.hi)) for n, s in stats.items()}

        def use_hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
            def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                st = stats[name]
                assert st.channel_absmax is not None
                st.observe_use(args[0].reshape(-1, args[0].shape[-1]).float().cpu(), absmax[name], st.channel_absmax)

            return fn

        _run_hooked(model, stats, use_hook, use_windows, "use-data coverage", progress)

    attr = attribute_kl(model, quantized, attribution_windows, progress=progress) if attribution_windows is not None else None
    layers = [_layer_record(n, model, qmods[n], stats[n], qw[n], attr.per_layer.get(n) if attr else None) for n in stats]
    if attr is not None:
        for rank, layer in enumerate(sorted(layers, key=lambda la: -(la["kl"] or 0.0)), start=1):
            layer["kl_rank"] = rank
    result: dict[str, Any] = {
        "meta": {"lowbit_version": __version__, "date": str(date.today()), "scheme": scheme.name, **(meta or {})},
        "kl": None
        if attr is None
        else {
            "all": attr.kl_all,
            "sum_of_layers": attr.sum_of_layers,
            "windows": int(attribution_windows.shape[0]),  # type: ignore[union-attr]
            "seq_len": int(attribution_windows.shape[1]),  # type: ignore[union-attr]
            "source": (meta or {}).get("attribution", ""),
        },
        "coverage": verdict(layers) if use_windows is not None else None,
        "layers": layers,
    }
    return result


def _layer_record(
    name: str, model: nn.Module, qm: nn.Module, st: _LayerStats, qw: torch.Tensor, kl: float | None
) -> dict[str, Any]:
    assert isinstance(qm, QuantLinear) and st.channel_absmax is not None
    w = cast(torch.Tensor, model.get_submodule(name).weight).detach().float()
    err = (qw - w).double()
    sample = torch.cat(st.sample).float().sort().values
    pct = {k: float(sample[min(int(q * sample.numel()), sample.numel() - 1)]) for k, q in PERCENTILES.items()}
    parts = name.split(".")
    block = next((int(p) for p in parts if p.isdigit()), -1)
    absmax = max(abs(st.lo), abs(st.hi))
    e = st.energy
    cov = None
    if st.use_n:
        assert st.use_channel_absmax is not None
        tokens = st.n // max(len(st.channel_absmax), 1)
        beyond = st.use_outside_channel / st.use_n
        cov = {
            "outside_fraction": st.use_outside / st.use_n,
            "outside_channel_fraction": beyond,
            # a token drawn from the calibration distribution exceeds a channel's max over n
            # calibration tokens with probability 1/(n+1): this ratio is ~1 when the use data is alike
            "channel_excess_ratio": beyond * (tokens + 1),
            "use_absmax": st.use_absmax,
            "ratio": st.use_absmax / absmax if absmax > 0 else math.inf,
            "channels_outside": float((st.use_channel_absmax > st.channel_absmax).float().mean()),
        }
    return {
        "name": name,
        "kind": parts[-1],
        "block": block,
        "shape": list(w.shape),
        "params": w.numel(),
        "weight": {"sqnr_db": _db(float(w.double().square().sum()), float(err.square().sum())), "mse": float(err.square().mean())},
        "output_sqnr_db": {k: _db(e["ref"], e[k]) for k in ("weights", "inputs", "both")},
        "input_absmax": absmax,
        "input_scale": float(qm.input_scale.float()) if qm.input_scale is not None else None,
        "clip_rate": st.clipped / max(st.n, 1),
        "act": {"min": st.lo, "max": st.hi, "percentiles": pct},
        "channel_absmax": [round(v, 6) for v in st.channel_absmax.tolist()],
        "hist": {"edges": [0.0, *HIST_EDGES.tolist(), math.inf], "counts": st.hist.tolist()},
        "kl": kl,
        "kl_rank": None,
        "coverage": cov,
    }

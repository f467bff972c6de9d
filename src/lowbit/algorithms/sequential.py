"""Layer-by-layer (sequential) calibration: one decoder layer at a time, each seeing the error of the
layers quantized before it.

1. The inputs of the first decoder layer are captured for every calibration sample (hidden states
   and the keyword arguments the model passes: attention mask, rotary embeddings, positions).
2. For each decoder layer in turn, on `device` (moved there and back if the model lives elsewhere,
   so the peak is about one layer plus the activations of the calibration batch):
   a. SmoothQuant: observe the per-channel absmax of the inputs of each smoothing group, fold the
      factors into the preceding norm or Linear (`lowbit.algorithms.smoothquant`);
   b. GPTQ: accumulate each target Linear's Hessian from its inputs and round its weight with
      error compensation (`lowbit.algorithms.gptq`); RTN: round to nearest;
   c. static schemes: observe each quantized Linear's input with quantized weights and set its
      input scale (as `lowbit.algorithms.ptq.calibrate_inputs` does for the whole model);
   d. run the quantized layer to produce the next layer's inputs.
3. Target Linears outside the decoder layers (if any are not ignored) are rounded to nearest.

Samples run one at a time (batch 1), so no padding enters any statistic and results do not depend
on a batch size. The decoder layers are found by structure (the ModuleList holding
`config.num_hidden_layers` modules), not by architecture name.

Step 2 for one layer is `quantize_layer`, shared with the streaming runtime (`lowbit.runtime`), which
feeds it one layer read from disk at a time, possibly on several ranks: every statistic (observer
ranges, GPTQ Hessians, SmoothQuant maxima, expert token counts) is reduced over the ranks'
samples through a `Collective`, and each module's solve runs on one rank and is broadcast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.gptq import HessianState, column_qdq, gptq, hessian_init, hessian_update
from lowbit.algorithms.ptq import PTQReport, expert_overrides, set_static_scales
from lowbit.errors import LowbitError
from lowbit.formats import fake_quantize
from lowbit.nn import QuantLinear, weight_scale
from lowbit.nn.experts import calibrate_all_experts, count_expert_tokens, is_expert_linear
from lowbit.nn.fused import apply_fusion_rules
from lowbit.observers import MinMaxObserver, Observer, make_observer
from lowbit.runtime.collective import LOCAL, Collective, owner
from lowbit.scheme import Scheme
from lowbit.targets import DEFAULT_IGNORE, select_linears, set_submodule

ALGORITHMS = ("rtn", "gptq", "smoothquant", "smoothquant+gptq", "awq", "awq+gptq")


@dataclass
class SequentialOptions:
    algorithm: str = "gptq"
    damp: float = 0.01  # GPTQ: fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # GPTQ: columns per lazy-update block
    # GPTQ: visit columns by decreasing Hessian diagonal; None: on for weights in groups (INT4 on
    # smollm2-135m: KL 0.364 -> 0.242, BENCHMARKS.md), off per channel (not measured there yet)
    actorder: bool | None = None
    alpha: float = 0.5  # SmoothQuant migration strength
    device: str | torch.device | None = None  # where each layer is processed (default: where it is)
    calibrate_all_experts: bool = False  # every expert also sees the tokens not routed to it (observed only)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise LowbitError(f"unknown algorithm {self.algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise LowbitError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")
        if not self.damp >= 0.0:
            raise LowbitError(f"GPTQ dampening must be >= 0, got {self.damp}")

    @property
    def steps(self) -> list[str]:
        return self.algorithm.split("+")


@dataclass
class LayerLog:
    """What happened to one Linear: the GPTQ objective against round-to-nearest, the dampening used."""

    gptq_error: float | None = None
    rtn_error: float | None = None
    damp: float | None = None
    smoothed: bool = False
    awq_alpha: float | None = None
    awq_loss_vs_rtn: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class SequentialReport(PTQReport):
    layers: dict[str, LayerLog] = field(default_factory=dict)
    peak_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        gains = [v.gptq_error / v.rtn_error for v in self.layers.values() if v.gptq_error is not None and v.rtn_error]
        if gains:
            out["gptq_error_vs_rtn_median"] = sorted(gains)[len(gains) // 2]
        out["layers"] = {k: v.to_dict() for k, v in self.layers.items()}
        if self.peak_bytes is not None:
            out["peak_bytes"] = self.peak_bytes
        return out


class _Stop(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, layers): the ModuleList of the model's repeated blocks, found by structure."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if any(isinstance(m, nn.Linear) for m in mod[0].modules()):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        raise LowbitError("cannot find the model's decoder layers (a ModuleList of blocks holding Linear layers)")
    return best


@torch.inference_mode()
def capture_inputs(
    model: nn.Module, first: nn.Module, samples: list[torch.Tensor], device: torch.device,
    input_device: torch.device | None = None,
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Per sample: (hidden states, keyword arguments) as the model calls the first decoder layer.
    input_device: where the token ids go (default: the device of the model's first parameter)."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: _to(v, device) for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hidden.to(device), rest))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    model_dev = input_device if input_device is not None else next(model.parameters()).device
    try:
        for s in samples:
            try:
                model(input_ids=s[None].to(model_dev), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(samples):
        raise LowbitError("the first decoder layer was not reached for every calibration sample")
    return captured


def _to(v: Any, device: torch.device) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_to(x, device) for x in v)
    return v


# A layer's calibration inputs: (hidden states (1, T, C), keyword arguments) per sample; iterated once
# per pass over the layer, so a list or a store that reads each sample from disk when asked.
LayerInputs = Iterable[tuple[torch.Tensor, dict[str, Any]]]
Emit = Callable[[int, torch.Tensor], None]


def _run_layer(layer: nn.Module, inputs: LayerInputs, emit: Emit | None = None) -> list[torch.Tensor]:
    """Run the layer on every sample: emit(i, output) per sample, or (no emit) the outputs as a list."""
    outs = []
    for i, (hidden, kwargs) in enumerate(inputs):
        out = layer(hidden, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if emit is None:
            outs.append(out)
        else:
            emit(i, out)
    return outs


def _run_hooked(
    layer: nn.Module,
    inputs: LayerInputs,
    modules: Mapping[str, nn.Module],
    fn: Callable[[str, torch.Tensor], None],
    emit: Emit | None = None,
) -> None:
    """Run the layer on every sample with fn(name, input) called on each of `modules`' inputs."""
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: fn(n, args[0])) for n, m in modules.items()]
    try:
        _run_layer(layer, inputs, emit if emit is not None else _drop)
    finally:
        for h in handles:
            h.remove()


@dataclass
class LayerContext:
    """What quantizing one decoder layer needs besides the layer and its inputs.

    quantized_downstream: True (the layer-by-layer algorithms): static input scales are observed with
    the layer's weights quantized, and the next layer's inputs come from the layer with its inputs
    quantized too, so every layer sees the whole error upstream. False: as whole-model calibration
    does it (`lowbit.algorithms.ptq.calibrate_inputs`): weights quantized, static inputs not, one
    pass both observes and produces the next layer's inputs; round-to-nearest streaming then writes
    the checkpoint `quantize_model` writes, bit for bit.
    """

    scheme: Scheme
    overrides: dict[str, Scheme]
    options: SequentialOptions
    scale_dtype: torch.dtype
    report: SequentialReport
    collective: Collective = LOCAL
    quantized_downstream: bool = True


@torch.inference_mode()
def quantize_sequential(
    model: nn.Module,
    scheme: Scheme,
    samples: list[torch.Tensor],
    options: SequentialOptions,
    *,
    ignore: Iterable[str] = (),
    default_ignore: Iterable[str] = DEFAULT_IGNORE,
    overrides: dict[str, Scheme] | None = None,
    progress: bool = True,
) -> SequentialReport:
    """Quantize `model` in place, one decoder layer at a time (see the module docstring)."""
    if not samples:
        raise LowbitError("sequential calibration needs calibration samples")
    targets, ignored = select_linears(model, ignore, default_ignore=default_ignore)
    overrides = expert_overrides(targets, scheme, overrides)
    report = SequentialReport(targets, ignored)
    ctx = LayerContext(scheme, overrides, options, model_scale_dtype(model), report)
    prefix, layers = find_decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(options.device) if options.device is not None else home
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    inputs = capture_inputs(model, layers[0], samples, device)
    report.seconds["capture"] = time.perf_counter() - t0
    done: set[str] = set()
    t0 = time.perf_counter()
    for i, layer in enumerate(tqdm(layers, desc=f"quantizing layers ({options.algorithm})", unit="layer",
                                   disable=not progress)):
        name = f"{prefix}.{i}"
        mine = [t for t in targets if t.startswith(name + ".")]
        layer.to(device)
        outs: list[torch.Tensor] = []
        quantize_layer(model, layer, name, mine, inputs, ctx, _collect(outs))
        inputs = [(h, kw) for h, (_, kw) in zip(outs, inputs, strict=True)]
        layer.to(home)
        done.update(mine)
    report.seconds["layers"] = time.perf_counter() - t0
    for t in targets:  # Linears outside the decoder layers: round to nearest
        if t not in done:
            quantize_outside(model, t, overrides.get(t, scheme), ctx.scale_dtype)
    report.fusion_unified = apply_fusion_rules(model)  # what vLLM's fused q/k/v and gate/up will run
    if device.type == "cuda":
        report.peak_bytes = torch.cuda.max_memory_allocated(device)
    return report


def _collect(outs: list[torch.Tensor]) -> Emit:
    return lambda _i, out: outs.append(out)


def model_scale_dtype(model: nn.Module) -> torch.dtype:
    """The dtype scales are stored in: the model's, but float32 for float16 models (fp16 cannot hold
    small scales precisely; readers accept float32)."""
    dtype = next(model.parameters()).dtype
    return torch.float32 if dtype == torch.float16 else dtype


def quantize_outside(model: nn.Module, t: str, s: Scheme, scale_dtype: torch.dtype) -> None:
    """Round a target Linear outside the decoder layers to nearest (no inputs are captured for it)."""
    lin = model.get_submodule(t)
    assert isinstance(lin, nn.Linear)
    if s.static_inputs:
        raise LowbitError(f"{t} is outside the decoder layers: a static input scale for it needs --ignore {t} "
                          "or a dynamic scheme")
    set_submodule(model, t, QuantLinear.from_linear(lin, s.weights, s.input_activations, scale_dtype))


@torch.inference_mode()
def quantize_layer(
    model: nn.Module,
    layer: nn.Module,
    name: str,
    mine: list[str],
    inputs: LayerInputs | None,
    ctx: LayerContext,
    emit: Emit | None = None,
) -> None:
    """Quantize one decoder layer of `model` (its target Linears `mine`, full names) on its inputs and
    run the quantized layer to give the next layer's inputs: emit(i, output) for the i-th sample.

    SmoothQuant / AWQ fold first; then GPTQ or round-to-nearest; then static input scales (see
    `LayerContext.quantized_downstream`). The fusion rules are not applied here (the caller does it
    once the outputs are computed, as the whole-model path does after calibration). inputs None:
    round-to-nearest weights only (nothing to calibrate)."""
    steps = ctx.options.steps
    col = ctx.collective
    if inputs is None:  # no calibration: round-to-nearest weights (dynamic or weight-only schemes)
        if steps != ["rtn"]:
            raise LowbitError(f"{ctx.options.algorithm} needs calibration inputs for {name}")
        _quantize_layer(model, layer, name, mine, [], ctx)
        if any(isinstance(m := model.get_submodule(t), QuantLinear) and m.input_scale is not None for t in mine):
            raise LowbitError(f"{name} has static input scales to calibrate but no calibration inputs")
        return
    if "smoothquant" in steps:
        _smooth(layer, name, mine, inputs, ctx.options.alpha, ctx.report, col)
    if "awq" in steps:
        if col.world > 1:
            raise LowbitError("AWQ searches each group's scales over the layer's gathered inputs and runs on one "
                              "process only; use one rank (or GPTQ / SmoothQuant on several)")
        _awq(layer, name, mine, inputs, ctx.scheme, ctx.overrides, ctx.scale_dtype, ctx.report)
    counts: dict[str, list[int]]
    with calibrate_all_experts(layer, ctx.options.calibrate_all_experts):
        _quantize_layer(model, layer, name, mine, inputs, ctx)
        if ctx.quantized_downstream:
            _calibrate_static(model, layer, mine, inputs, ctx)
        else:  # one pass observes the static inputs and gives the next layer's (with the experts counted)
            with count_expert_tokens(layer, name) as counts:
                _calibrate_static(model, layer, mine, inputs, ctx, emit if emit is not None else _drop)
    if ctx.quantized_downstream:
        with count_expert_tokens(layer, name) as counts:  # the tokens this layer's experts really get
            _run_layer(layer, inputs, emit if emit is not None else _drop)
    ctx.report.tokens_per_expert.update(_sum_counts(counts, col))


def _drop(_i: int, _out: torch.Tensor) -> None:
    return None


def _sum_counts(counts: dict[str, list[int]], col: Collective) -> dict[str, list[int]]:
    if col.world == 1 or not counts:
        return counts
    keys = sorted(counts)
    flat = col.all_reduce(torch.tensor([c for k in keys for c in counts[k]], dtype=torch.int64), "sum").tolist()
    out, i = {}, 0
    for k in keys:
        out[k], i = flat[i: i + len(counts[k])], i + len(counts[k])
    return out


def _hessian_sum(state: HessianState, x: torch.Tensor) -> None:
    """Several ranks: accumulate the unnormalized sum of x x^T (float32) and the token count; the
    ranks' sums are added and scaled by 2 / n once, where `hessian_update` keeps a running mean."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if x2.shape[0] == 0:
        return
    if not torch.isfinite(x2).all():
        raise LowbitError("NaN or Inf in a layer's calibration input: the Hessian would be meaningless")
    state.h.addmm_(x2.t(), x2)
    state.n += x2.shape[0]


def _hessians(
    layer: nn.Module, linears: dict[str, nn.Linear], inputs: LayerInputs, col: Collective
) -> dict[str, HessianState]:
    """Each Linear's GPTQ Hessian, complete on the rank that solves it (`owner`); token counts on all."""
    hessians = {t: hessian_init(lin.in_features, lin.weight.device) for t, lin in linears.items()}
    if col.world == 1:
        _run_hooked(layer, inputs, linears, lambda t, x: hessian_update(hessians[t], x))
        return hessians
    _run_hooked(layer, inputs, linears, lambda t, x: _hessian_sum(hessians[t], x))
    n = col.all_reduce(torch.tensor([hessians[t].n for t in linears], dtype=torch.int64), "sum").tolist()
    for k, t in enumerate(linears):
        hs, dst = hessians[t], owner(k, col.world)
        hs.n = int(n[k])
        if hs.n:
            col.reduce_sum(hs.h, dst)
        if col.rank == dst and hs.n:
            hs.h.mul_(2.0 / hs.n)
        elif col.rank != dst:
            hs.h = hs.h.new_empty(0)  # only the owner solves: free the partial sum
    return hessians


def _quantize_layer(
    model: nn.Module,
    layer: nn.Module,
    name: str,
    mine: list[str],
    inputs: LayerInputs,
    ctx: LayerContext,
) -> None:
    """GPTQ (when a step) or round-to-nearest for each target Linear of the layer. With several ranks
    the k-th module is solved by rank k % world and its codes and scales are broadcast."""
    options, report, col = ctx.options, ctx.report, ctx.collective
    linears: dict[str, nn.Linear] = {}
    for t in mine:
        lin = model.get_submodule(t)
        if not isinstance(lin, nn.Linear):
            raise LowbitError(f"{t} is {type(lin).__name__}, not Linear")
        linears[t] = lin
        bad = int((~torch.isfinite(lin.weight)).sum())
        if bad:
            raise LowbitError(f"NaN or Inf in the weight of {t} ({bad} values): the model itself is broken")
    hessians = _hessians(layer, linears, inputs, col) if "gptq" in options.steps else {}
    for k, (t, lin) in enumerate(linears.items()):
        s = ctx.overrides.get(t, ctx.scheme)
        log = report.layers.setdefault(t, LayerLog())
        src = owner(k, col.world)
        if t in hessians and hessians[t].n == 0 and is_expert_linear(t):
            report.experts_without_tokens.append(t)  # no Hessian: round to nearest (named in the report)
        elif t in hessians and hessians[t].n == 0:
            raise LowbitError(f"{t} received no calibration tokens, so GPTQ has no Hessian for it")
        if col.rank != src:
            q = _empty_quant(lin, s, ctx.scale_dtype)
        elif t in hessians and hessians[t].n > 0:
            args, fmt = s.weights, s.weights.format

            def scale_fn(w: torch.Tensor, args: Any = args, scale_dtype: torch.dtype = ctx.scale_dtype) -> torch.Tensor:
                return weight_scale(w, args, scale_dtype)

            res = gptq(
                lin.weight.detach().float(),
                hessians[t].h,
                column_qdq(fmt),
                scale_fn,
                group_size=args.group_size if args.strategy == "group" else None,
                block_size=options.block_size,
                damp=options.damp,
                actorder=options.actorder if options.actorder is not None else args.strategy == "group",
            )
            q = QuantLinear.from_quantized(lin, s.weights, s.input_activations, ctx.scale_dtype, res.weight, res.scale)
            log.gptq_error, log.rtn_error, log.damp = res.error, res.rtn_error, res.damp
        else:
            q = QuantLinear.from_linear(lin, s.weights, s.input_activations, ctx.scale_dtype)
        if col.world > 1:
            _share(q, log, src, col)
        hessians.pop(t, None)
        set_submodule(model, t, q)


def _empty_quant(lin: nn.Linear, s: Scheme, scale_dtype: torch.dtype) -> QuantLinear:
    """A QuantLinear of lin's shape and bias, its codes and scales to be received from another rank."""
    q = QuantLinear(lin.in_features, lin.out_features, weights=s.weights, input_activations=s.input_activations,
                    bias=lin.bias is not None, scale_dtype=scale_dtype, device=lin.weight.device)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q


def _share(q: QuantLinear, log: LayerLog, src: int, col: Collective) -> None:
    """Rank `src`'s codes, scales and GPTQ numbers to every rank."""
    col.broadcast(q.weight, src)
    col.broadcast(q.weight_scale, src)
    nums = [log.gptq_error, log.rtn_error, log.damp]
    t = col.broadcast(torch.tensor([math.nan if v is None else v for v in nums], dtype=torch.float64), src)
    log.gptq_error, log.rtn_error, log.damp = (None if math.isnan(v) else v for v in t.tolist())


def _calibrate_static(
    model: nn.Module,
    layer: nn.Module,
    mine: list[str],
    inputs: LayerInputs,
    ctx: LayerContext,
    emit: Emit | None = None,
) -> None:
    """Set the static input scales of this layer's QuantLinears from inputs seen with quantized weights
    (observers reduced over the ranks). With `emit`, the same pass gives the next layer's inputs."""
    static = {t: m for t in mine if isinstance(m := model.get_submodule(t), QuantLinear) and m.input_scale is not None}
    if not static:
        if emit is not None:
            _run_layer(layer, inputs, emit)
        return
    observers: dict[str, Observer] = {}
    for t in static:
        s = ctx.overrides.get(t, ctx.scheme)
        assert s.input_activations is not None
        observers[t] = make_observer(s.input_activations.observer or "minmax", t)
    for m in static.values():
        m.quantize_inputs = False
    cached = [m for m in static.values()] if emit is not None else []
    for m in cached:  # many forwards over the same weights: dequantize them once (identical values)
        m.cache_weight(_layer_dtype(layer))
    try:
        _run_hooked(layer, inputs, static, lambda t, x: observers[t].update(x.reshape(-1, x.shape[-1])), emit)
    finally:
        for m in static.values():
            m.quantize_inputs = True
        for m in cached:
            m.cache_weight(None)
    _reduce_observers(observers, ctx.collective)
    unseen = set_static_scales(static, observers)
    report = ctx.report
    report.experts_without_tokens += [t for t in unseen if t not in report.experts_without_tokens]
    for t in static:
        report.tokens_seen[t] = observers[t].tokens


def _layer_dtype(layer: nn.Module) -> torch.dtype:
    for p in layer.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _reduce_observers(observers: dict[str, Observer], col: Collective) -> None:
    """Min-max state over all ranks: min of minima, max of maxima, sum of tokens (exact)."""
    if col.world == 1 or not observers:
        return
    odd = [o.where for o in observers.values() if not isinstance(o, MinMaxObserver)]
    if odd:
        raise LowbitError(f"the {observers[odd[0]].name} observer depends on the order of the samples and cannot be "
                          "combined over ranks; use minmax with several ranks")
    names = list(observers)
    inf = math.inf
    f32 = torch.float32
    lo = torch.tensor([float(o.min_val) if o.min_val is not None else inf for o in observers.values()], dtype=f32)
    hi = torch.tensor([float(o.max_val) if o.max_val is not None else -inf for o in observers.values()], dtype=f32)
    tok = torch.tensor([o.tokens for o in observers.values()], dtype=torch.int64)
    col.all_reduce(lo, "min")
    col.all_reduce(hi, "max")
    col.all_reduce(tok, "sum")
    for k, n in enumerate(names):
        o = observers[n]
        o.tokens = int(tok[k])
        o.min_val, o.max_val = (lo[k].clone(), hi[k].clone()) if o.tokens else (None, None)


def _smooth(
    layer: nn.Module,
    name: str,
    mine: list[str],
    inputs: LayerInputs,
    alpha: float,
    report: SequentialReport,
    collective: Collective = LOCAL,
) -> None:
    """SmoothQuant on this layer's smoothing groups (see `smoothing_groups`); the channel maxima are
    reduced over the ranks (exact)."""
    from lowbit.algorithms.smoothquant import smoothing_factors

    groups = smoothing_groups(layer, name, mine)
    if not groups:
        return
    absmax: dict[str, torch.Tensor] = {}
    firsts = {g.linears[0]: layer.get_submodule(g.linears[0][len(name) + 1 :]) for g in groups}

    def observe(t: str, x: torch.Tensor) -> None:
        a = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        absmax[t] = a if t not in absmax else torch.maximum(absmax[t], a)

    _run_hooked(layer, inputs, firsts, observe)
    for t, lin in firsts.items():  # a rank without tokens contributes zeros
        a = absmax.get(t)
        if a is None:
            a = torch.zeros(cast(nn.Linear, lin).in_features, device=cast(nn.Linear, lin).weight.device)
        absmax[t] = collective.all_reduce(a, "max")
    for g in groups:
        lins = [layer.get_submodule(t[len(name) + 1 :]) for t in g.linears]
        s = smoothing_factors(absmax[g.linears[0]], [cast(torch.Tensor, lin.weight).detach() for lin in lins], alpha)
        _fold(layer, g, lins, s)
        for t in g.linears:
            report.layers.setdefault(t, LayerLog()).smoothed = True


def _awq(
    layer: nn.Module,
    name: str,
    mine: list[str],
    inputs: LayerInputs,
    scheme: Scheme,
    overrides: dict[str, Scheme],
    scale_dtype: torch.dtype,
    report: SequentialReport,
) -> None:
    """AWQ on this layer's smoothing groups: per group, the scales of least quantized output error
    (`lowbit.algorithms.awq.awq_search`) with the group's own weight quantizer, folded like SmoothQuant."""
    from lowbit.algorithms.awq import awq_search

    groups = smoothing_groups(layer, name, mine)
    firsts = {g.linears[0]: layer.get_submodule(g.linears[0][len(name) + 1 :]) for g in groups}
    seen: dict[str, list[torch.Tensor]] = {t: [] for t in firsts}
    _run_hooked(layer, inputs, firsts, lambda t, x: seen[t].append(x.detach().reshape(-1, x.shape[-1])))
    for g in groups:
        schemes = {overrides.get(t, scheme) for t in g.linears}
        if len(schemes) > 1:
            continue  # readers quantized differently: one scale vector cannot suit them all
        args = schemes.pop().weights

        def qdq(w: torch.Tensor, args: Any = args) -> torch.Tensor:
            return fake_quantize(w, weight_scale(w, args, scale_dtype), args.format)

        lins = [layer.get_submodule(t[len(name) + 1 :]) for t in g.linears]
        weights = [cast(torch.Tensor, lin.weight).detach().float() for lin in lins]
        res = awq_search(torch.cat(seen[g.linears[0]]), weights, qdq)
        _fold(layer, g, lins, res.scales)
        for t in g.linears:
            log = report.layers.setdefault(t, LayerLog())
            log.awq_alpha, log.awq_loss_vs_rtn = res.alpha, (res.loss / res.rtn_loss if res.rtn_loss else None)


def _fold(layer: nn.Module, g: SmoothGroup, lins: list[nn.Module], s: torch.Tensor) -> None:
    """Divide the output of g.previous by s and multiply the readers' weight columns by s (exact in
    real arithmetic; each tensor is rounded once to its dtype)."""
    from lowbit.algorithms.smoothquant import fold_into_linear_output, fold_into_norm, scale_weight_inputs

    prev = layer.get_submodule(g.previous)
    if isinstance(prev, nn.Linear):
        w, b = fold_into_linear_output(prev.weight.detach(), None if prev.bias is None else prev.bias.detach(), s)
        prev.weight.copy_(w)
        if prev.bias is not None and b is not None:
            prev.bias.copy_(b)
    else:
        weight = cast(torch.Tensor, prev.weight)
        weight.copy_(fold_into_norm(weight.detach(), s))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_((bias.detach().float() / s).to(bias.dtype))
    for lin in lins:
        w_in = cast(torch.Tensor, lin.weight)
        w_in.copy_(scale_weight_inputs(w_in.detach(), s))


@dataclass(frozen=True)
class SmoothGroup:
    previous: str  # module (relative to the decoder layer) whose output feeds the group: a norm or a Linear
    linears: tuple[str, ...]  # full names of the Linears that read that output


# (previous module, readers) by leaf names; the previous module's output must reach the readers
# unchanged but for an elementwise product (gate * up -> down) or attention's linear mixing of
# value rows (v -> o, only when every head has its own value projection, no grouped KV).
_SMOOTH_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def smoothing_groups(layer: nn.Module, name: str, mine: list[str]) -> list[SmoothGroup]:
    """The groups SmoothQuant can fold in this layer: patterns whose modules exist and whose readers
    are all quantized (the fold must cover every reader, and one kept in high precision gains nothing).
    A previous Linear kept in high precision still takes the fold: the product is unchanged."""
    out = []
    have = dict(layer.named_modules())
    for prev, readers in _SMOOTH_PATTERNS:
        full = tuple(f"{name}.{r}" for r in readers)
        if prev in have and all(r in have for r in readers) and all(f in mine for f in full):
            out.append(SmoothGroup(prev, full))
    return out

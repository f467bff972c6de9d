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
"""

from __future__ import annotations

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
from lowbit.observers import Observer, make_observer
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
    model: nn.Module, first: nn.Module, samples: list[torch.Tensor], device: torch.device
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Per sample: (hidden states, keyword arguments) as the model calls the first decoder layer."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: _to(v, device) for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hidden.to(device), rest))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    model_dev = next(model.parameters()).device
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


def _run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]]) -> list[torch.Tensor]:
    outs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _run_hooked(
    layer: nn.Module,
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    modules: Mapping[str, nn.Module],
    fn: Callable[[str, torch.Tensor], None],
) -> None:
    """Run the layer on every sample with fn(name, input) called on each of `modules`' inputs."""
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: fn(n, args[0])) for n, m in modules.items()]
    try:
        _run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()


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
    scale_dtype = next(model.parameters()).dtype
    if scale_dtype == torch.float16:
        scale_dtype = torch.float32
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
        if "smoothquant" in options.steps:
            _smooth(layer, name, mine, inputs, options.alpha, report)
        if "awq" in options.steps:
            _awq(layer, name, mine, inputs, scheme, overrides, scale_dtype, report)
        with calibrate_all_experts(layer, options.calibrate_all_experts):
            _quantize_layer(model, layer, name, mine, scheme, overrides, inputs, options, scale_dtype, report)
        with count_expert_tokens(layer, name) as counts:  # the tokens this layer's experts really get
            inputs = [(h, kw) for h, (_, kw) in zip(_run_layer(layer, inputs), inputs, strict=True)]
        report.tokens_per_expert.update(counts)
        layer.to(home)
        done.update(mine)
    report.seconds["layers"] = time.perf_counter() - t0
    for t in targets:  # Linears outside the decoder layers: round to nearest
        if t not in done:
            lin = model.get_submodule(t)
            assert isinstance(lin, nn.Linear)
            s = overrides.get(t, scheme)
            if s.static_inputs:
                raise LowbitError(f"{t} is outside the decoder layers: a static input scale for it needs --ignore {t} "
                                  "or a dynamic scheme")
            set_submodule(model, t, QuantLinear.from_linear(lin, s.weights, s.input_activations, scale_dtype))
    report.fusion_unified = apply_fusion_rules(model)  # what vLLM's fused q/k/v and gate/up will run
    if device.type == "cuda":
        report.peak_bytes = torch.cuda.max_memory_allocated(device)
    return report


def _quantize_layer(
    model: nn.Module,
    layer: nn.Module,
    name: str,
    mine: list[str],
    scheme: Scheme,
    overrides: dict[str, Scheme],
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    options: SequentialOptions,
    scale_dtype: torch.dtype,
    report: SequentialReport,
) -> None:
    linears: dict[str, nn.Linear] = {}
    for t in mine:
        lin = model.get_submodule(t)
        if not isinstance(lin, nn.Linear):
            raise LowbitError(f"{t} is {type(lin).__name__}, not Linear")
        linears[t] = lin
        bad = int((~torch.isfinite(lin.weight)).sum())
        if bad:
            raise LowbitError(f"NaN or Inf in the weight of {t} ({bad} values): the model itself is broken")
    hessians: dict[str, HessianState] = {}
    if "gptq" in options.steps:
        hessians = {t: hessian_init(lin.in_features, lin.weight.device) for t, lin in linears.items()}
        _run_hooked(layer, inputs, linears, lambda t, x: hessian_update(hessians[t], x))
    for t, lin in linears.items():
        s = overrides.get(t, scheme)
        log = report.layers.setdefault(t, LayerLog())
        if t in hessians and hessians[t].n == 0 and is_expert_linear(t):
            report.experts_without_tokens.append(t)  # no Hessian: round to nearest (named in the report)
            q = QuantLinear.from_linear(lin, s.weights, s.input_activations, scale_dtype)
        elif t in hessians:
            if hessians[t].n == 0:
                raise LowbitError(f"{t} received no calibration tokens, so GPTQ has no Hessian for it")
            args, fmt = s.weights, s.weights.format

            def scale_fn(w: torch.Tensor, args: Any = args) -> torch.Tensor:
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
            q = QuantLinear.from_quantized(lin, s.weights, s.input_activations, scale_dtype, res.weight, res.scale)
            log.gptq_error, log.rtn_error, log.damp = res.error, res.rtn_error, res.damp
        else:
            q = QuantLinear.from_linear(lin, s.weights, s.input_activations, scale_dtype)
        set_submodule(model, t, q)
    _calibrate_static(model, layer, mine, inputs, scheme, overrides, report)


def _calibrate_static(
    model: nn.Module,
    layer: nn.Module,
    mine: list[str],
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    scheme: Scheme,
    overrides: dict[str, Scheme],
    report: SequentialReport,
) -> None:
    """Set the static input scales of this layer's QuantLinears from inputs seen with quantized weights."""
    static = {t: m for t in mine if isinstance(m := model.get_submodule(t), QuantLinear) and m.input_scale is not None}
    if not static:
        return
    observers: dict[str, Observer] = {}
    for t in static:
        s = overrides.get(t, scheme)
        assert s.input_activations is not None
        observers[t] = make_observer(s.input_activations.observer or "minmax", t)
    for m in static.values():
        m.quantize_inputs = False
    try:
        _run_hooked(layer, inputs, static, lambda t, x: observers[t].update(x.reshape(-1, x.shape[-1])))
    finally:
        for m in static.values():
            m.quantize_inputs = True
    unseen = set_static_scales(static, observers)
    report.experts_without_tokens += [t for t in unseen if t not in report.experts_without_tokens]
    for t in static:
        report.tokens_seen[t] = observers[t].tokens


def _smooth(
    layer: nn.Module,
    name: str,
    mine: list[str],
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    alpha: float,
    report: SequentialReport,
) -> None:
    """SmoothQuant on this layer's smoothing groups (see `smoothing_groups`)."""
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
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
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

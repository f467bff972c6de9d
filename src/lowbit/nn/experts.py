"""Mixture-of-Experts: fused 3-D expert parameters as per-expert Linear modules, found by structure.

transformers 5 stores experts as 3-D parameters (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I),
or transposed (E, H, 2I) / (E, I, H)), not as `nn.Linear`; a tool that swaps only Linears skips
them. `linearize_experts` replaces every module holding 3-D parameters by `LinearExperts`: one
`ExpertMLP` per expert with 2-D `gate_proj`, `up_proj`, `down_proj` Linears (the names vLLM loads:
`mlp.experts.E.gate_proj.weight`; the architecture's own checkpoint names, e.g. Mixtral's w1/w3/w2,
come from transformers' conversion mapping). From then on every tool in lowbit (quantization,
calibration, GPTQ, export, the native kernels) treats experts as the Linears they are.

The replaced module's computation is kept, described by the flags transformers' experts
implementations carry (`has_gate`, `is_concatenated`, `is_transposed`, `has_bias`,
`_apply_gate` for custom gating such as GPT-OSS's clamped SwiGLU, `post_expert_norm`):

* routed experts (`forward(hidden, top_k_index, top_k_weights)`): each expert runs on the tokens
  routed to it, its output weighted and summed, as transformers' eager implementation does;
* dense experts (Llama-4: `forward(hidden)` with (E * T, H) inputs, every expert on its slice).

A module with 3-D parameters lowbit cannot interpret raises an error naming it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.scheme import Scheme

log = logging.getLogger("lowbit")

GATE_UP, UP, DOWN = "gate_up_proj", "up_proj", "down_proj"


@dataclass(frozen=True)
class ExpertLayout:
    num_experts: int
    hidden: int
    intermediate: int
    has_gate: bool  # gate_up_proj (gate and up rows) or up_proj alone
    concatenated: bool  # [gate; up] rows, or interleaved gate0, up0, gate1, ...
    transposed: bool  # stored (E, in, out) instead of (E, out, in)
    has_bias: bool
    routed: bool  # forward(hidden, top_k_index, top_k_weights); False: dense, forward(hidden)
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert Linear names


def three_d_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that hold 3-D parameters of their own (fused experts, or something else)."""
    return [(n, m) for n, m in model.named_modules()
            if any(p.dim() == 3 for p in m.parameters(recurse=False))]


def _hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "hidden_size", None)


def expert_leaf_names(model: nn.Module) -> tuple[str, str, str]:
    """The per-expert (gate, up, down) Linear names of this architecture's checkpoints, read from
    transformers' conversion mapping (Mixtral: w1, w3, w2); gate_proj/up_proj/down_proj otherwise."""
    names = ["gate_proj", "up_proj", "down_proj"]
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        transforms = get_model_conversion_mapping(model, add_legacy=False)  # type: ignore[arg-type]
    except Exception:
        return ("gate_proj", "up_proj", "down_proj")
    for t in transforms or []:
        targets = " ".join(getattr(t, "target_patterns", []) or [])
        leaves = [m.group(1) for p in getattr(t, "source_patterns", []) or []
                  if (m := re.search(r"experts\.\*\.(\w+)\.weight$", p))]
        if "experts.gate_up_proj" in targets and len(leaves) == 2:
            names[0], names[1] = leaves
        elif "experts.down_proj" in targets and len(leaves) == 1:
            names[2] = leaves[0]
    return (names[0], names[1], names[2])


def interpret(name: str, module: nn.Module, hidden: int | None) -> ExpertLayout:
    """The layout of a fused-experts module, or a LowbitError naming what cannot be interpreted."""
    p3 = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    known = {GATE_UP, UP, DOWN}
    if DOWN not in p3 or not ({GATE_UP, UP} & p3.keys()) or set(p3) - known:
        raise LowbitError(f"{name} ({type(module).__name__}) holds 3-D parameters {sorted(p3)} that lowbit cannot "
                          "interpret as experts (expected gate_up_proj or up_proj, and down_proj): add it to --ignore "
                          "to keep it in high precision, or --allow-partial")
    has_gate = GATE_UP in p3
    up, down = p3[GATE_UP if has_gate else UP], p3[DOWN]
    e = up.shape[0]
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:
        normal = hidden is not None and up.shape[2] == hidden and down.shape[1] == hidden
        flipped = hidden is not None and up.shape[1] == hidden and down.shape[2] == hidden
        if normal == flipped:
            raise LowbitError(f"{name} ({type(module).__name__}): cannot tell from shapes {tuple(up.shape)}, "
                              f"{tuple(down.shape)} whether its experts are stored transposed")
        transposed = flipped
    h, i = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    up_out = up.shape[2] if transposed else up.shape[1]
    if up_out != (2 * i if has_gate else i) or down.shape[0] != e or (hidden is not None and h != hidden):
        raise LowbitError(f"{name} ({type(module).__name__}): expert shapes {tuple(up.shape)} and "
                          f"{tuple(down.shape)} do not fit one gate/up and down projection per expert")
    routed = hasattr(module, "has_gate")  # transformers' experts implementations set these flags
    if not routed:
        params = [p for p in inspect.signature(module.forward).parameters if p not in ("self", "args", "kwargs")]
        if params != ["hidden_states"]:
            raise LowbitError(f"{name} ({type(module).__name__}): an experts module whose forward takes {params} "
                              "is not one lowbit can run (routed: hidden, top_k_index, top_k_weights; dense: hidden)")
    biases = {n for n, p in module.named_parameters(recurse=False) if p.dim() == 2 and n.endswith("_bias")}
    return ExpertLayout(num_experts=e, hidden=h, intermediate=i, has_gate=has_gate,
                        concatenated=bool(getattr(module, "is_concatenated", True)), transposed=bool(transposed),
                        has_bias=bool(biases), routed=routed)


def _linear(w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> nn.Linear:
    w = w.t() if transposed else w
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach().contiguous().clone(), requires_grad=w.requires_grad)
    if b is not None:
        lin.bias = nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
    return lin


class ExpertMLP(nn.Module):
    """One expert: gate (optional), up and down projections as 2-D Linears, under the checkpoint's names."""

    def __init__(self, gate: nn.Linear | None, up: nn.Linear, down: nn.Linear, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        if gate is not None:
            self.add_module(names[0], gate)
        self.add_module(names[1], up)
        self.add_module(names[2], down)

    def proj(self, which: int) -> nn.Module:
        return self.get_submodule(self.names[which])


class LinearExperts(nn.Module):
    """Experts as `ExpertMLP` children "0".."E-1" (state dict names `experts.E.gate_proj.weight`)."""

    def __init__(self, source: nn.Module, layout: ExpertLayout) -> None:
        super().__init__()
        self.layout = layout
        self.num_experts = layout.num_experts
        gu = getattr(source, GATE_UP if layout.has_gate else UP)
        down = getattr(source, DOWN)
        gu_b = getattr(source, (GATE_UP if layout.has_gate else UP) + "_bias", None)
        down_b = getattr(source, DOWN + "_bias", None)
        i = layout.intermediate
        for e in range(layout.num_experts):
            w = gu[e].t() if layout.transposed else gu[e]  # (2I or I, H)
            b = gu_b[e] if gu_b is not None else None
            if layout.has_gate:
                rows = (slice(0, i), slice(i, 2 * i)) if layout.concatenated else (slice(0, None, 2), slice(1, None, 2))
                gate = _linear(w[rows[0]], None if b is None else b[rows[0]], False)
                up = _linear(w[rows[1]], None if b is None else b[rows[1]], False)
            else:
                gate, up = None, _linear(w, b, False)
            dn = _linear(down[e], None if down_b is None else down_b[e], layout.transposed)
            self.add_module(str(e), ExpertMLP(gate, up, dn, layout.names))
        # the source keeps what the computation needs (act_fn, _apply_gate, alpha, ...) without its weights
        for n in [n for n, p in source.named_parameters(recurse=False)]:
            delattr(source, n)
        object.__setattr__(self, "_source", source)  # not a submodule: no state, no name
        if hasattr(source, "post_expert_norm"):
            self.post_expert_norm = source.post_expert_norm
        self.calibrate_all = False  # during calibration: every expert also sees the tokens not routed to it
        self.count_tokens = False
        self.tokens_routed = torch.zeros(layout.num_experts, dtype=torch.long)

    def experts(self) -> Iterator[ExpertMLP]:
        for e in range(self.num_experts):
            yield self.get_submodule(str(e))  # type: ignore[misc]

    def _expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        m: ExpertMLP = self.get_submodule(str(e))  # type: ignore[assignment]
        src: Any = self._source
        if self.layout.has_gate:
            g, u = m.proj(0)(h), m.proj(1)(h)
            gu = torch.cat([g, u], -1) if self.layout.concatenated else torch.stack([g, u], -1).flatten(-2)
            a = src._apply_gate(gu) if hasattr(src, "_apply_gate") else src.act_fn(g) * u
        else:
            a = src.act_fn(m.proj(1)(h))
        y = m.proj(2)(a)
        norm = getattr(self, "post_expert_norm", None)
        if norm is not None:
            y = norm(y)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.layout.routed:
            return self._dense(hidden_states)
        assert top_k_index is not None and top_k_weights is not None, "routed experts need the router's choice"
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, k_pos = torch.where(top_k_index == e)  # (T, k) -> the tokens routed to e
            if self.count_tokens:
                self.tokens_routed[e] += token_idx.numel()
            if self.calibrate_all:
                rest = torch.ones(hidden_states.shape[0], dtype=torch.bool, device=hidden_states.device)
                rest[token_idx] = False
                if rest.any():  # observed only: the layer's output is that of the routed tokens alone
                    self._expert(e, hidden_states[rest])
            if token_idx.numel() == 0:
                continue
            y = self._expert(e, hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def _dense(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])  # (E, T, H), Llama-4 style
        if self.count_tokens:  # tokens a router sent here: rows it did not scale to zero
            self.tokens_routed += (x != 0).any(-1).sum(-1).cpu()
        return torch.stack([self._expert(e, x[e]) for e in range(self.num_experts)]).view(-1, self.layout.hidden)

    def extra_repr(self) -> str:
        lay = self.layout
        return (f"experts={lay.num_experts}, hidden={lay.hidden}, intermediate={lay.intermediate}, "
                f"{'routed' if lay.routed else 'dense'}, {'gated' if lay.has_gate else 'ungated'}")


def linearize_experts(model: nn.Module, skip: Any = None, *, keep_unreadable: bool = False) -> list[str]:
    """Replace every fused-experts module by `LinearExperts` (in place); returns their names.
    `skip(name) -> bool` leaves a module as it is (an --ignore pattern); anything else with 3-D
    parameters that cannot be interpreted raises, unless `keep_unreadable` (--allow-partial): then
    it stays as it is, in high precision, with a warning, and the integrity gate reports it."""
    from lowbit.targets import set_submodule

    hidden = _hidden_size(model)
    names = expert_leaf_names(model)
    done = []
    for name, mod in three_d_modules(model):
        if isinstance(mod, LinearExperts) or (skip is not None and skip(name)):
            continue
        try:
            layout = interpret(name, mod, hidden)
        except LowbitError as e:
            if not keep_unreadable:
                raise
            log.warning("%s; kept in high precision (--allow-partial)", e)
            continue
        layout = ExpertLayout(**{**layout.__dict__, "names": names})
        set_submodule(model, name, LinearExperts(mod, layout))
        done.append(name)
    return done


def expert_modules(model: nn.Module) -> list[tuple[str, LinearExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LinearExperts)]


EXPERT_LINEAR = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)$")


def is_expert_linear(name: str) -> bool:
    return EXPERT_LINEAR.fullmatch(name) is not None


def moe_scheme(scheme: Scheme) -> Scheme:
    """The scheme experts take under `scheme`: vLLM's FP8 MoE kernels accept static input scales
    only with per-tensor weights, so a static FP8 scheme with per-channel weights gives its experts
    one weight scale per projection (per expert); every other scheme applies as it is."""
    w = scheme.weights
    if scheme.static_inputs and w.type == "float" and w.strategy == "channel":
        return Scheme(f"{scheme.name}-experts", replace(w, strategy="tensor"), scheme.input_activations)
    return scheme


@contextlib.contextmanager
def calibrate_all_experts(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While calibrating with `enabled`: every expert also runs on the tokens not routed to it
    (observed only; each layer's output stays that of its routed tokens), so rarely chosen
    experts get real statistics."""
    mods = [m for _, m in expert_modules(model)]
    for m in mods:
        m.calibrate_all = enabled
    try:
        yield
    finally:
        for m in mods:
            m.calibrate_all = False


@contextlib.contextmanager
def count_expert_tokens(model: nn.Module, prefix: str = "") -> Iterator[dict[str, list[int]]]:
    """Count the tokens routed to each expert of `model` (a model or one decoder layer, whose
    names get `prefix`) during the block: {experts module: [count per expert]}, filled on exit."""
    mods = expert_modules(model)
    counts: dict[str, list[int]] = {}
    for _, m in mods:
        m.tokens_routed.zero_()
        m.count_tokens = True
    try:
        yield counts
    finally:
        for n, m in mods:
            m.count_tokens = False
            counts[f"{prefix}.{n}" if prefix else n] = [int(c) for c in m.tokens_routed]

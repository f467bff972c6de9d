"""Round-to-nearest post-training quantization with calibrated static activation scales.

Two phases, as gpt-fast does it: quantize every target Linear's weight (swap in QuantLinear),
then, for static schemes, run the calibration samples through the model with quantized weights
(as AutoFP8 does, so each layer's input already carries the error of the layers before it),
observe every QuantLinear input, and store one scale per layer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.metrics import model_device
from lowbit.nn import QuantLinear, weight_scale_shape
from lowbit.nn.experts import calibrate_all_experts as calibrate_all_experts_
from lowbit.nn.experts import count_expert_tokens, is_expert_linear, moe_scheme
from lowbit.nn.fused import apply_fusion_rules
from lowbit.observers import Observer, make_observer
from lowbit.scheme import Scheme
from lowbit.targets import DEFAULT_IGNORE, select_linears, set_submodule

log = logging.getLogger("lowbit")


@dataclass
class PTQReport:
    targets: list[str]
    ignored: list[str]
    tokens_seen: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # shards whose scales were unified with their fused siblings' (`lowbit.nn.fused.apply_fusion_rules`)
    fusion_unified: list[str] = field(default_factory=list)
    # Mixture-of-Experts: calibration tokens routed to each expert, per experts module, and the
    # static expert layers that saw none (they take the largest input scale of their layer's experts)
    tokens_per_expert: dict[str, list[int]] = field(default_factory=dict)
    experts_without_tokens: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantized_modules": len(self.targets),
            "ignored": self.ignored,
            "tokens_seen_min": min(self.tokens_seen.values()) if self.tokens_seen else None,
            "fusion_unified": self.fusion_unified,
            **({"tokens_per_expert": self.tokens_per_expert,
                "experts_without_tokens": self.experts_without_tokens} if self.tokens_per_expert else {}),
            "seconds": self.seconds,
        }


def expert_overrides(targets: list[str], scheme: Scheme, overrides: dict[str, Scheme] | None) -> dict[str, Scheme]:
    """`overrides` plus, for expert projections, the scheme vLLM's MoE kernels take (`moe_scheme`)."""
    out = dict(overrides or {})
    for t in targets:
        if is_expert_linear(t):
            s = moe_scheme(out.get(t, scheme))
            if s is not out.get(t, scheme):
                out[t] = s
    return out


def quantize_weights(
    model: nn.Module,
    scheme: Scheme,
    targets: list[str],
    scale_dtype: torch.dtype,
    overrides: dict[str, Scheme] | None = None,
) -> None:
    """Swap every target Linear for a QuantLinear of `scheme` (or of `overrides[name]`)."""
    for name in targets:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear), f"{name} is {type(linear).__name__}, not Linear"
        bad = int((~torch.isfinite(linear.weight)).sum())
        if bad:
            raise LowbitError(f"NaN or Inf in the weight of {name} ({bad} values): the model itself is broken")
        s = (overrides or {}).get(name, scheme)
        try:
            weight_scale_shape(s.weights, linear.out_features, linear.in_features)  # a group size that does not fit
        except LowbitError as e:
            raise LowbitError(f"{name}: {e}") from None
        q = QuantLinear.from_linear(linear, s.weights, s.input_activations, scale_dtype)
        set_submodule(model, name, q)


def set_static_scales(layers: dict[str, QuantLinear], observers: dict[str, Observer]) -> list[str]:
    """Store each layer's observed input scale. An expert that saw no token is left for
    `apply_fusion_rules` to give the largest scale of its layer's experts (what vLLM runs anyway);
    its name is returned. Any other layer without a token is an error naming it."""
    unseen = []
    for n, m in layers.items():
        if observers[n].tokens == 0 and is_expert_linear(n):
            m.input_tokens = 0
            unseen.append(n)
            continue
        m.set_input_scale(observers[n].amax())  # raises, naming the layer, when it saw no token
        m.input_tokens = observers[n].tokens
    if unseen:
        log.warning("%d expert projection(s) saw no calibration token and take the largest input scale of their "
                    "layer's experts (e.g. %s); --calibrate-all-experts runs every expert on every token",
                    len(unseen), unseen[0])
    return unseen


@torch.inference_mode()
def calibrate_inputs(
    model: nn.Module, samples: list[torch.Tensor], observer: str, *, batch_size: int = 1, progress: bool = True,
    calibrate_all_experts: bool = False, report: PTQReport | None = None,
) -> dict[str, Observer]:
    """Observe the input of every static QuantLinear over the samples; set and return the observers.

    samples: 1-D token id tensors. Batches are right-padded; padded positions are masked out of
    the statistics, and observers update once per sample, so results do not depend on batch size.
    Experts see the rows routed to them ((tokens, C), padding included when batch_size > 1).
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None}
    observers = {n: make_observer(observer, n, m.input_args.format if m.input_args else None) for n, m in layers.items()}
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x, mask = args[0], mask_holder["mask"]  # x: (B, T, C); mask: (B, T) bool
            if x.dim() != 3 or x.shape[:2] != mask.shape:  # an expert's routed tokens, (tokens, C)
                observers[name].update(x.reshape(-1, x.shape[-1]))
                return
            for b in range(x.shape[0]):
                observers[name].update(x[b][mask[b]])

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    dtype = next(model.parameters()).dtype
    for m in layers.values():
        m.quantize_inputs = False
        m.cache_weight(dtype)
    device = model_device(model)
    stack = contextlib.ExitStack()
    stack.enter_context(calibrate_all_experts_(model, calibrate_all_experts))
    counts = stack.enter_context(count_expert_tokens(model))
    try:
        order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))  # similar lengths batch together
        for start in tqdm(range(0, len(order), batch_size), desc="calibrating", unit="batch", disable=not progress):
            batch = [samples[i] for i in order[start : start + batch_size]]
            length = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), length, dtype=torch.long)
            mask = torch.zeros(len(batch), length, dtype=torch.bool)
            for b, s in enumerate(batch):
                ids[b, : len(s)], mask[b, : len(s)] = s, True
            mask_holder["mask"] = mask.to(device)
            model(input_ids=ids.to(device), attention_mask=mask.to(device).long(), use_cache=False)
    finally:
        stack.close()
        for h in handles:
            h.remove()
        for m in layers.values():
            m.quantize_inputs = True
            m.cache_weight(None)
    unseen = set_static_scales(layers, observers)
    if report is not None:
        report.tokens_per_expert, report.experts_without_tokens = counts, unseen
    return observers


def quantize_model(
    model: nn.Module,
    scheme: Scheme,
    samples: list[torch.Tensor] | None,
    *,
    ignore: Iterable[str] = (),
    default_ignore: Iterable[str] = DEFAULT_IGNORE,
    batch_size: int = 1,
    progress: bool = True,
    overrides: dict[str, Scheme] | None = None,
    calibrate_all_experts: bool = False,
    allow_partial: bool = False,
) -> PTQReport:
    """Quantize `model` in place with `scheme` (layers named in `overrides` with their own scheme:
    a mixed-precision plan); `samples` are needed for static activation scales. Fused experts
    become per-expert Linears first (`lowbit.nn.experts`)."""
    targets, ignored = select_linears(model, ignore, default_ignore=default_ignore, allow_partial=allow_partial)
    overrides = expert_overrides(targets, scheme, overrides)
    unknown = sorted(set(overrides or {}) - set(targets))
    if unknown:
        raise LowbitError(f"a per-layer scheme names {unknown[0]}, which is not a quantized Linear here")
    report = PTQReport(targets, ignored)
    scale_dtype = next(model.parameters()).dtype
    if scale_dtype == torch.float16:  # fp16 cannot hold small scales precisely; readers accept float32
        scale_dtype = torch.float32
    t0 = time.perf_counter()
    quantize_weights(model, scheme, targets, scale_dtype, overrides)
    report.seconds["weights"] = time.perf_counter() - t0
    static = [s for s in (scheme, *(overrides or {}).values()) if s.static_inputs]
    if static:
        observer = {s.input_activations.observer or "minmax" for s in static}  # type: ignore[union-attr]
        if len(observer) > 1:
            raise LowbitError(f"static layers with different observers ({', '.join(sorted(observer))}) in one model")
        if not samples:
            raise ValueError("static activation scales need calibration samples")
        t0 = time.perf_counter()
        observers = calibrate_inputs(model, samples, observer.pop(), batch_size=batch_size, progress=progress,
                                     calibrate_all_experts=calibrate_all_experts, report=report)
        report.seconds["calibration"] = time.perf_counter() - t0
        report.tokens_seen = {n: o.tokens for n, o in observers.items()}
    report.fusion_unified = apply_fusion_rules(model)  # what vLLM's fused q/k/v and gate/up will run
    return report

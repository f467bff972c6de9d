"""Fused sibling layers, as serving engines run them: q/k/v as one GEMM, gate/up as one GEMM.

vLLM loads `q_proj`, `k_proj` and `v_proj` (and `gate_proj`/`up_proj`) into one matrix and runs one
activation quantization and one GEMM for all of them. It keeps one static input scale for the fused
matrix (the largest of the shards') and, for per-tensor weights, one weight scale: each shard is
dequantized with its own scale and requantized with the largest.

Two parts:

* `apply_fusion_rules(model)` makes the stored scales obey those rules at quantization time, so what
  lowbit evaluates is what vLLM runs (for static inputs the shards of a unit see the same input, so
  their observed maxima are equal anyway; per-tensor weight scales do differ and are requantized);
* `fuse_quantized(model)` is the runtime side: each unit's shards keep their own modules (and state
  dict names) but share one concatenated `QuantLinear` whose weight they view, and the first shard
  called with an input computes every shard's output at once; the others return their slice.
  Identical numbers to the unfused layers up to the GEMM's summation order, fewer kernels (one
  activation quantization instead of three, and up to FUSED_GEMM_MAX_ROWS rows one GEMM instead of
  three): the decode-time win.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from lowbit.formats import dequantize, quantize
from lowbit.nn.qlinear import QuantLinear
from lowbit.targets import fusion_units

log = logging.getLogger("lowbit")

# Up to this many rows (decode, small batches) a unit runs as one wide GEMM, whose outputs are sliced;
# above it (prefill) the activation is still quantized once, but each shard gets its own GEMM and a
# contiguous output, which the attention and SiLU * up that follow read faster than strided slices.
FUSED_GEMM_MAX_ROWS = 512


def _quant_units(model: nn.Module) -> list[list[tuple[str, QuantLinear]]]:
    """Fusion units of two or more QuantLinear shards with one scheme and one input dimension."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    units = []
    for unit in fusion_units(layers):
        mods = [(n, layers[n]) for n in unit]
        if len(mods) < 2:
            continue
        first = mods[0][1]
        if any(m.weight_args != first.weight_args or m.input_args != first.input_args
               or m.in_features != first.in_features or m.weight.dtype != first.weight.dtype
               or m.weight.device != first.weight.device for _, m in mods):
            continue  # a mixed-precision plan keeps fused shards alike; anything else is left alone
        units.append(mods)
    return units


def _expert_scale_groups(model: nn.Module) -> list[list[tuple[str, QuantLinear]]]:
    """Per experts module: its experts' static gate/up layers, and its experts' static down layers."""
    from lowbit.nn.experts import expert_modules

    groups = []
    for name, le in expert_modules(model):
        for projs in ((0, 1), (2,)):
            g = []
            for e, exp in enumerate(le.experts()):
                for i in projs:
                    if i == 0 and not le.layout.has_gate:
                        continue
                    q = exp.proj(i)
                    if isinstance(q, QuantLinear) and q.input_scale is not None:
                        g.append((f"{name}.{e}.{exp.names[i]}", q))
            if g:
                groups.append(g)
    return groups


@torch.no_grad()
def apply_fusion_rules(model: nn.Module) -> list[str]:
    """Give every fusion unit one static input scale (the largest) and, for per-tensor weights, one
    weight scale (the largest, each shard requantized to it). For Mixture-of-Experts, vLLM keeps
    one static input scale per layer for all experts' gate/up and one for their down projections
    (the largest): the experts' scales are unified the same way, and an expert that saw no
    calibration token (`input_tokens == 0`) takes that largest scale. Returns the shards whose
    stored values changed."""
    changed = []
    for group in _expert_scale_groups(model):
        seen = [m.input_scale.float().reshape(()) for _, m in group  # type: ignore[union-attr]
                if m.input_tokens != 0]
        if not seen:
            continue  # no expert of this layer saw a token: calibration has already refused
        top = torch.stack(seen).max()
        for n, m in group:
            assert m.input_scale is not None
            if m.input_tokens == 0 or m.input_scale.float().reshape(()) != top:
                m.input_scale.copy_(top.to(m.input_scale.dtype).reshape(1, 1))
                m._native_scales = None
                changed.append(n)
    for mods in _quant_units(model):
        ms = [m for _, m in mods]
        if ms[0].input_scale is not None:
            top = torch.stack([m.input_scale.float().reshape(()) for m in ms if m.input_scale is not None]).max()
            for n, m in mods:
                assert m.input_scale is not None
                if m.input_scale.float().reshape(()) != top:
                    m.input_scale.copy_(top.to(m.input_scale.dtype).reshape(1, 1))
                    m._native_scales = None
                    changed.append(n)
        if ms[0].weight_args.strategy == "tensor":
            top = torch.stack([m.weight_scale.float().reshape(()) for m in ms]).max()
            for n, m in mods:
                if m.weight_scale.float().reshape(()) != top:
                    w = dequantize(m.weight, m.weight_scale, torch.float32)
                    new_scale = top.to(m.weight_scale.dtype).reshape(1, 1)
                    m.weight.copy_(quantize(w, new_scale, m.weight_args.format))
                    m.weight_scale.copy_(new_scale)
                    m._native_scales = None
                    changed.append(n)
    return sorted(set(changed))


class FusedGroup:
    """One GEMM for a unit's shards. `output(i, x)` is shard i's result for input x: computed for all
    shards when x is new (or shard i already took its slice of this x), then handed out by slice.
    The cache is dropped once every shard has taken its slice, so nothing stale is kept between
    steps. Inputs are matched by identity: a caller that changes x in place between two shards of
    one unit would see the first value (no transformers model does)."""

    def __init__(self, fused: QuantLinear, splits: list[int]) -> None:
        self.fused = fused
        self.splits = splits
        self._x: torch.Tensor | None = None
        self._outs: tuple[torch.Tensor, ...] = ()
        self._pending: set[int] = set()

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        if x.device != self.fused.weight.device:
            return None  # the model moved after fusing: the shards run on their own
        if self._x is not x or i not in self._pending:
            rows = x.numel() // x.shape[-1]
            outs = self.fused.native_split_forward(x, self.splits) if rows > FUSED_GEMM_MAX_ROWS else None
            self._outs = tuple(outs) if outs is not None else tuple(self.fused(x).split(self.splits, dim=-1))
            self._x, self._pending = x, set(range(len(self.splits)))
        self._pending.discard(i)
        out = self._outs[i]
        if not self._pending:
            self._x, self._outs = None, ()
        return out


@torch.no_grad()
def fuse_quantized(model: nn.Module) -> int:
    """Fuse every unit of QuantLinear shards that can run as one layer (same scheme, equal static
    input scales); the shards' weights become views of the fused weight, so memory does not grow.
    Returns the number of units fused. Undo with `unfuse_quantized` before changing weights."""
    count = 0
    for mods in _quant_units(model):
        ms = [m for _, m in mods]
        in_scales = {float(m.input_scale.float()) for m in ms if m.input_scale is not None}
        if len(in_scales) > 1:
            log.debug("not fusing %s: input scales differ", ", ".join(n for n, _ in mods))
            continue
        w_args = ms[0].weight_args
        if w_args.strategy == "tensor" and len({float(m.weight_scale.float()) for m in ms}) > 1:
            w_args = replace(w_args, strategy="channel")  # one scale per shard, expanded to its rows
        if w_args.strategy == "group":
            continue  # group-wise layers are weight-only: nothing to share
        splits = [m.out_features for m in ms]
        fused = QuantLinear(ms[0].in_features, sum(splits), weights=w_args, input_activations=ms[0].input_args,
                            bias=any(m.bias is not None for m in ms), scale_dtype=ms[0].weight_scale.dtype,
                            device=ms[0].weight.device)
        fused.weight = torch.cat([m.weight for m in ms])
        if w_args.strategy == ms[0].weight_args.strategy:
            fused.weight_scale = torch.cat([m.weight_scale for m in ms]) if w_args.strategy == "channel" \
                else ms[0].weight_scale.clone()
        else:
            fused.weight_scale = torch.cat([m.weight_scale.reshape(1, 1).expand(m.out_features, 1) for m in ms])
        if fused.input_scale is not None:
            fused.input_scale = ms[0].input_scale.clone()  # type: ignore[union-attr]
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias if m.bias is not None else
                                                 torch.zeros(m.out_features, device=m.weight.device) for m in ms]),
                                      requires_grad=False)
        fused.native, fused.fast_accum = ms[0].native, ms[0].fast_accum
        group = FusedGroup(fused, splits)
        offset = 0
        for i, m in enumerate(ms):
            m.weight = fused.weight[offset: offset + m.out_features]
            offset += m.out_features
            m._fusion = (group, i)
        count += 1
    return count


def unfuse_quantized(model: nn.Module) -> None:
    """Give every fused shard its own weight storage back and run it on its own."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m._fusion is not None:
            m.weight = m.weight.clone()
            m._fusion = None

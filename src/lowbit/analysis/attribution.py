"""How much of the final KL divergence each quantized layer causes: quantize one layer at a time.

For every quantized Linear l, the original model runs with only layer l replaced by its quantized
version (same calibrated scales as the fully quantized model), and the KL divergence of its
next-token distribution from the original's is measured on the given windows. That is exact for
"this layer alone" (no estimate); what it does not capture is how layers' errors combine, so the
result also carries the KL of the fully quantized model and the sum over layers, which says how
far from additive the errors are (on small models the sum is several times the whole: each
layer's error is partly absorbed, partly amplified downstream).

Precision: the passes run in float32 whatever the model's dtype. In bf16 any perturbation, however
small, sends the rounding of every later activation a different way, and on smollm2-135m that alone
costs a KL of about 0.0018 (a 0.1% random change of one k_proj gave 0.0018, a 3% one 0.0019; in
float32 they give 1e-7 and 1e-4). Per-layer FP8 errors are of the same order, so in bf16 the ranking
is noise. Each quantized layer is dequantized to float32 as well; its scales and codes are unchanged.

Cost: one forward over the windows per layer (the original's log-probabilities are computed once),
and a float32 copy of the model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.mixed import Unit, unit_name
from lowbit.nn import QuantLinear


@dataclass
class Attribution:
    kl_all: float  # KL of the fully quantized model
    per_unit: dict[Unit, float] = field(default_factory=dict)  # KL with only this unit quantized

    @property
    def per_layer(self) -> dict[str, float]:
        """Per unit, labelled by `unit_name` (a unit of one layer is labelled by the layer's name)."""
        return {unit_name(u): v for u, v in self.per_unit.items()}

    @property
    def sum_of_layers(self) -> float:
        return sum(self.per_unit.values())


def _kl(ref_logp: list[torch.Tensor], model: nn.Module, windows: torch.Tensor) -> float:
    """Mean per-token KL(ref || model) over the windows, float32 softmax."""
    total, n = 0.0, 0
    for i, w in enumerate(windows):
        logp = torch.log_softmax(model(input_ids=w[None]).logits[0].float(), dim=-1)
        ref = ref_logp[i].float()
        total += float((ref.exp() * (ref - logp)).sum(-1).sum())
        n += w.numel()
    return total / max(n, 1)


@contextmanager
def swapped_in(base: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Run each of base's modules `name` as `replacements[name]` (forward hooks), for the block."""
    with ExitStack() as stack:
        for name, rep in replacements.items():
            h = base.get_submodule(name).register_forward_hook(lambda _m, args, _out, r=rep: r(args[0]))
            stack.callback(h.remove)
        yield


@torch.inference_mode()
def attribute_kl(
    base: nn.Module,
    quantized: nn.Module,
    windows: torch.Tensor,
    *,
    units: list[Unit] | None = None,
    progress: bool = True,
    desc: str = "KL per layer",
) -> Attribution:
    """Per unit of quantized layers of `quantized` (QuantLinear modules): KL on `windows` (N, T)
    with only that unit quantized. Units default to one per QuantLinear; give
    `lowbit.targets.fusion_units` to measure fused shards (q/k/v, gate/up) together.

    `base` and `quantized` are the same architecture; `quantized` is the fully quantized copy.
    """
    device = next(base.parameters()).device
    windows = windows.to(device)
    qmods = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    base32 = base if next(base.parameters()).dtype == torch.float32 else copy.deepcopy(base).float()
    quantized32 = _float32_copy(quantized)
    for m in qmods.values():
        m.cache_weight(torch.float32)
    try:
        ref = [torch.log_softmax(base32(input_ids=w[None]).logits[0].float(), dim=-1).to(torch.bfloat16) for w in windows]
        # the reference is stored in bf16 to halve memory; the KL of the base against itself through
        # this rounding is subtracted as the floor of the measurement
        floor = _kl(ref, base32, windows)
        out = Attribution(kl_all=max(_kl(ref, quantized32, windows) - floor, 0.0))
        for unit in tqdm(units or [(n,) for n in qmods], desc=desc, unit="unit", disable=not progress):
            missing = [n for n in unit if n not in qmods]
            if missing:
                raise ValueError(f"{missing[0]} is not a quantized layer of the model")
            with swapped_in(base32, {n: qmods[n] for n in unit}):
                out.per_unit[tuple(unit)] = max(_kl(ref, base32, windows) - floor, 0.0)
    finally:
        for m in qmods.values():
            m.cache_weight(None)
    return out


def _float32_copy(model: nn.Module) -> nn.Module:
    """`model` with its float parameters in float32; QuantLinear buffers (codes and scales) untouched.

    QuantLinear computes in its input's dtype, so float32 activations give a float32 forward.
    (`Module.float()` would also convert the float8 weight codes, which are floating-point dtypes.)
    """
    out = copy.deepcopy(model)
    for mod in out.modules():
        if isinstance(mod, QuantLinear):
            mod.cache_weight(torch.float32)
            continue
        for p in mod.parameters(recurse=False):
            p.data = p.data.float()
        for k, b in mod.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                setattr(mod, k, b.float())
    return out

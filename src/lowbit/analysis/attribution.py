"""How much of the final KL divergence each quantized layer causes: quantize one layer at a time.

For every quantized Linear l, the original model runs with only layer l replaced by its quantized
version (same calibrated scales as the fully quantized model), and the KL divergence of its
next-token distribution from the original's is measured on the given windows. That is exact for
"this layer alone" (no estimate); what it does not capture is how layers' errors combine, so the
result also carries the KL of the fully quantized model and the sum over layers, which says how
far from additive the errors are (on small models the sum is several times the whole: each
layer's error is partly absorbed, partly amplified downstream).

Cost: one forward over the windows per layer (the original's log-probabilities are computed once).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.nn import QuantLinear


@dataclass
class Attribution:
    kl_all: float  # KL of the fully quantized model
    per_layer: dict[str, float] = field(default_factory=dict)  # KL with only this layer quantized

    @property
    def sum_of_layers(self) -> float:
        return sum(self.per_layer.values())


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
def swapped_in(base: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    """Run base's module `name` as `replacement` (a forward hook), for the duration of the block."""
    handle = base.get_submodule(name).register_forward_hook(lambda _m, args, _out: replacement(args[0]))
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def attribute_kl(
    base: nn.Module, quantized: nn.Module, windows: torch.Tensor, *, progress: bool = True
) -> Attribution:
    """Per quantized layer of `quantized` (QuantLinear modules): KL on `windows` (N, T) with only it quantized.

    `base` and `quantized` are the same architecture; `quantized` is the fully quantized copy.
    """
    device = next(base.parameters()).device
    windows = windows.to(device)
    qmods = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    dtype = next(base.parameters()).dtype
    for m in qmods.values():
        m.cache_weight(dtype)
    try:
        ref = [torch.log_softmax(base(input_ids=w[None]).logits[0].float(), dim=-1).to(torch.bfloat16) for w in windows]
        # the reference is stored in bf16 to halve memory; the KL of the base against itself through
        # this rounding is subtracted as the floor of the measurement
        floor = _kl(ref, base, windows)
        out = Attribution(kl_all=max(_kl(ref, quantized, windows) - floor, 0.0))
        for name, qm in tqdm(qmods.items(), desc="KL per layer", unit="layer", disable=not progress):
            with swapped_in(base, name, qm):
                out.per_layer[name] = max(_kl(ref, base, windows) - floor, 0.0)
    finally:
        for m in qmods.values():
            m.cache_weight(None)
    return out

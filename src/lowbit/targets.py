"""Which modules a scheme quantizes: found by structure, filtered by the user's ignore patterns.

A pattern is a glob matched against the module's full dotted name or any dotted suffix of it
(`lm_head`, `mlp.down_proj`, `model.layers.0.*`), or a regular expression with a `re:` prefix
(the compressed-tensors convention) matched with re.fullmatch against the full name.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from torch import nn

from lowbit.errors import LowbitError

# Kept in high precision by default: the output head, Mixture-of-Experts routers (vLLM runs them
# unquantized), and vision towers and projectors of multimodal models (only the language model is
# quantized; calibration is text).
ROUTER_LEAVES = ("gate", "router", "shared_expert_gate")
VISION = r"re:(.*\.)?(vision_tower|vision_model|visual|multi_modal_projector|mm_projector|vision_encoder)(\..*)?"
DEFAULT_IGNORE = ("lm_head", *ROUTER_LEAVES, VISION)


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def check_patterns(patterns: Iterable[str]) -> None:
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise LowbitError(f"--ignore pattern {p!r} is not a valid regular expression: {e}") from None


def select_linears(
    model: nn.Module, ignore: Iterable[str] = (), *, default_ignore: Iterable[str] = DEFAULT_IGNORE,
    allow_partial: bool = False,
) -> tuple[list[str], list[str]]:
    """(targets, ignored): names of nn.Linear modules to quantize and of those kept in high precision.

    Fused 3-D experts are first turned into per-expert Linears (`lowbit.nn.experts`, in place), so
    they are targets like any other Linear; an experts module matched by a pattern stays as it is.
    Every user pattern must match at least one Linear (or experts module), so a typo never passes
    silently. `ignored` also names the routers of MoE blocks, Linear or not.
    """
    from lowbit.nn.experts import linearize_experts, three_d_modules

    user = list(ignore)
    check_patterns(user)
    patterns = list(default_ignore) + user
    kept_3d = [n for n, _ in three_d_modules(model) if any(matches(n, p) for p in patterns)]
    linearize_experts(model, skip=lambda n: n in kept_3d, keep_unreadable=allow_partial)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise LowbitError("the model has no Linear layers to quantize")
    unmatched = [p for p in user if not any(matches(n, p) for n in [*linears, *kept_3d])]
    if unmatched:
        raise LowbitError(f"--ignore pattern(s) matched no Linear layer: {', '.join(unmatched)}")
    ignored = [n for n in linears if any(matches(n, p) for p in patterns)]
    ignored += [n for n in [*router_modules(model), *kept_3d] if n not in ignored]
    targets = [n for n in linears if n not in set(ignored)]
    if not targets:
        raise LowbitError("every Linear layer is ignored: nothing left to quantize")
    return targets, ignored


def router_modules(model: nn.Module) -> list[str]:
    """MoE routers: modules named gate / router / shared_expert_gate beside an experts module."""
    from lowbit.nn.experts import LinearExperts

    out = []
    for name, m in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf in ROUTER_LEAVES and not isinstance(m, LinearExperts):
            owner = model.get_submodule(parent) if parent else model
            if any(isinstance(c, LinearExperts) or any(p.dim() == 3 for p in c.parameters(recurse=False))
                   for c in owner.children()):
                out.append(name)
    return out


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


# Sibling Linear layers that serving engines fuse into one GEMM (vLLM's `packed_modules_mapping`):
# a fused layer has one quantization scheme, so its shards must be quantized (or kept) alike.
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),  # Mixtral-style experts
    ("q_a_proj", "kv_a_proj_with_mqa"),  # DeepSeek MLA
)


def fusion_units(names: Iterable[str]) -> list[tuple[str, ...]]:
    """`names` partitioned into the units a serving engine runs as one layer, in first-seen order.

    Shards of a fused layer (same parent module, leaf names from one FUSED_SIBLINGS tuple) form one
    unit; every other Linear is a unit of its own.
    """
    units: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    for i, name in enumerate(names):
        parent, _, leaf = name.rpartition(".")
        family = next((k for k, fam in enumerate(FUSED_SIBLINGS) if leaf in fam), None)
        key = (parent, family) if family is not None else (name, -1 - i)
        if key not in units:
            units[key] = []
            order.append(key)
        units[key].append(name)
    return [tuple(units[k]) for k in order]

"""Module names as checkpoints spell them.

transformers 5 renames some architectures' modules on load (Mixtral's `block_sparse_moe` is `mlp` in
the model) and renames them back when it saves, from its conversion mapping; vLLM reads the saved
(original) names. lowbit writes tensors, config-group targets and the ignore list under the saved
names, and maps them back when it loads. Only the mapping's plain renamings apply here: lowbit
writes experts one by one (`lowbit.nn.experts`), so the converters that fuse them do not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def _renamings(model: nn.Module) -> list[Any]:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model, add_legacy=False)  # type: ignore[arg-type]
    except Exception:  # an older transformers, or a model it has no mapping for
        return []
    return [t for t in transforms or [] if type(t) is WeightRenaming]


def _renamer(renamings: list[Any]) -> Callable[[str], str]:
    if not renamings:
        return lambda key: key
    from transformers.core_model_loading import apply_renamings

    def rename(key: str) -> str:
        # the patterns expect the leading dot of a full key ("model.layers.0.mlp."); module names
        # have no trailing part, so rename them as keys with a dummy leaf
        return str(apply_renamings(key + ".x", renamings))[:-2]

    return rename


def to_checkpoint(model: nn.Module) -> Callable[[str], str]:
    """Model module or tensor name -> the name its checkpoint uses."""
    return _renamer([r.reverse_transform() for r in reversed(_renamings(model))])


def to_model(model: nn.Module) -> Callable[[str], str]:
    """Checkpoint module or tensor name -> the model's name."""
    return _renamer(_renamings(model))

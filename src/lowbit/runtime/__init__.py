"""Where work runs: layer streaming from disk (`streaming`), resume state (`resume`), the plan of
memory, disk and time (`plan`), and torch.distributed ranks (`distributed`). Algorithms see only
`collective.Collective` and never know whether they run on one process or many."""

from __future__ import annotations

from typing import Any

__all__ = ["quantize_streaming"]


def __getattr__(name: str) -> Any:  # lazy: lowbit.algorithms imports runtime.collective at no cost
    if name == "quantize_streaming":
        from lowbit.runtime.streaming import quantize_streaming

        return quantize_streaming
    raise AttributeError(f"module 'lowbit.runtime' has no attribute {name!r}")

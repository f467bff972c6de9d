"""lowbit: quantize LLMs to low-bit formats and measure honestly what it costs."""

from __future__ import annotations

__version__ = "0.1.0"

from lowbit.errors import LowbitError

__all__ = ["LowbitError", "__version__", "load", "quantize"]


def __getattr__(name: str):  # lazy: `import lowbit` stays cheap for the CLI's --help
    if name == "load":
        from lowbit.checkpoint.load import load

        return load
    if name == "quantize":
        from lowbit.api import quantize

        return quantize
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")

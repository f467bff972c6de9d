"""Plain-text tables for the terminal (no dependency, aligned columns)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def render(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    if headers:
        cells.insert(0, list(headers))
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if headers and j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

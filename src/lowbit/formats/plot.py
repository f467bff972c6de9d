"""`lowbit formats plot`: where each format's values lie (log axis) and its rounding error across the range."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lowbit.formats.registry import Format, positive_grid, relative_error_curve


def plot_formats(fmts: Sequence[Format], output: Path, *, points: int = 20000) -> Path:
    """Write a two-panel PNG/SVG/PDF (by suffix): value grids on top, relative error below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 2.2 + 0.45 * len(fmts) + 3.2), sharex=True, height_ratios=[0.5 + 0.45 * len(fmts), 3.2]
    )
    lo = min(float(positive_grid(f)[0]) for f in fmts)
    hi = max(float(positive_grid(f)[-1]) for f in fmts)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, f in enumerate(fmts):
        g = positive_grid(f).numpy()
        c = colors[i % len(colors)]
        top.vlines(g, i - 0.35, i + 0.35, color=c, linewidth=0.6 if g.size > 64 else 1.2)
        x = torch.logspace(torch.log10(torch.tensor(g[0] / 4)).item(), torch.log10(torch.tensor(g[-1] * 1.5)).item(), points)
        err = relative_error_curve(f, x).numpy()
        bottom.plot(x.numpy(), err * 100, color=c, linewidth=0.8, label=f"{f.name} ({g.size} positive values)")
    top.set_yticks(range(len(fmts)), [f.name for f in fmts])
    top.set_ylim(-0.7, len(fmts) - 0.3)
    top.invert_yaxis()
    top.set_title("Representable positive values (element grid, before any scale)")
    bottom.set_xscale("log")
    bottom.set_xlim(lo / 4, hi * 1.5)
    bottom.set_ylim(0, 100)
    bottom.set_ylabel("relative rounding error (%)")
    bottom.set_xlabel("|x| (log scale): below the smallest value x flushes to 0 (100%), above the largest it saturates")
    bottom.grid(True, which="major", alpha=0.3)
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.tmp{output.suffix}")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(output)
    return output

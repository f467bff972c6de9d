"""Tables, Markdown, JSON and a plot for `lowbit formats compare` (no computation here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.analysis.format_compare import CANDIDATES, EIGHT_BIT, by_kind
from lowbit.checkpoint.io import atomic_directory, write_json
from lowbit.table import render

_SHORT = {"e5m2": "E5M2", "e4m3fn": "E4M3", "e3m4": "E3M4", "int8": "INT8", "mxfp4": "MXFP4", "nvfp4": "NVFP4"}


def _winners(counts: dict[str, int]) -> str:
    return " ".join(f"{_SHORT[k]}:{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def summary_table(result: dict[str, Any]) -> str:
    """Per projection kind: tails and mean SQNR per format, for weights and for inputs, and the winners."""
    rows = []
    for r in by_kind(result["layers"]):
        for which, label in (("weight", "W"), ("input", "A")):
            d = r[which]
            rows.append(
                [
                    f"{r['kind']} {label}",
                    f"{d['median_excess_kurtosis']:.1f}",
                    f"{d['median_max_over_std']:.1f}",
                    *[f"{d['sqnr_db'][c]:.1f}" for c in CANDIDATES],
                    _winners(d["winners"]),
                ]
            )
    head = ["layers (median over depth)", "kurt", "max/std", *[f"{_SHORT[c]} dB" for c in CANDIDATES], "best 8-bit (count)"]
    return render(rows, head)


def finding_table(result: dict[str, Any]) -> str:
    rows = []
    for which in ("weight", "input"):
        for fmt, d in result["finding"][which].items():
            rows.append([which, _SHORT[fmt], d["tensors"], f"{d['median_excess_kurtosis']:.1f}"])
    return render(rows, ["tensor", "best 8-bit format", "tensors", "median excess kurtosis"])


def layer_table(result: dict[str, Any]) -> str:
    rows = []
    for layer in result["layers"]:
        w, a = layer["weight"], layer["input"]
        rows.append(
            [
                layer["name"],
                f"{w['excess_kurtosis']:.1f}",
                f"{a['excess_kurtosis']:.1f}",
                f"{a['max_over_std']:.1f}",
                f"{100 * a['beyond_6sigma']:.3f}",
                *[f"{w['sqnr_db'][c]:.1f}/{a['sqnr_db'][c]:.1f}" for c in CANDIDATES],
                f"{_SHORT[layer['recommend']['weight']]}/{_SHORT[layer['recommend']['input']]}",
            ]
        )
    head = ["layer", "W kurt", "A kurt", "A max/std", "A >6s %", *[f"{_SHORT[c]} W/A" for c in CANDIDATES], "best W/A"]
    return render(rows, head)


def markdown(result: dict[str, Any]) -> str:
    meta = result.get("meta", {})
    parts = [
        "# Format comparison",
        "",
        f"Model `{meta.get('model', '?')}`, calibration {meta.get('calibration', '?')}.",
        "8-bit formats: weights scaled per output channel, inputs with one static scale per tensor (absmax over the",
        "calibration tokens). 4-bit block formats: MXFP4 (block 32, E8M0 scale), NVFP4 (block 16, E4M3 + FP32 scales).",
        "SQNR in dB (higher is better). Kurtosis is excess kurtosis (0 for a Gaussian).",
        "",
        "## By projection",
        "",
        "```",
        summary_table(result),
        "```",
        "",
        "## The exponent finding (Kuzmin et al. 2022) on this model",
        "",
        "```",
        finding_table(result),
        "```",
        "",
        "## Every layer (W = weight SQNR dB, A = input SQNR dB)",
        "",
        "```",
        layer_table(result),
        "```",
        "",
    ]
    return "\n".join(parts)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    fig, axes = plt.subplots(3, 1, figsize=(13, 11))
    idx = list(range(len(layers)))
    for ax, which, title in ((axes[0], "weight", "weights (per-channel / block scales)"), (axes[1], "input", "inputs (static per-tensor / block scales)")):
        for c in CANDIDATES:
            ax.plot(idx, [layer[which]["sqnr_db"][c] for layer in layers], label=_SHORT[c], linewidth=1, marker=".", markersize=3)
        ax.set_title(f"SQNR of {title}, layers in model order")
        ax.set_ylabel("SQNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(ncol=6, fontsize=8)
    ax = axes[2]
    for which, marker in (("weight", "o"), ("input", "^")):
        for c in EIGHT_BIT:
            pts = [(layer[which]["excess_kurtosis"], layer[which]["sqnr_db"]["e4m3fn"] - layer[which]["sqnr_db"]["int8"]) for layer in layers if layer["recommend"][which] == c]
            if pts:
                ax.scatter([max(p[0], 1e-2) for p in pts], [p[1] for p in pts], marker=marker, s=14, label=f"{which}: best {_SHORT[c]}")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("excess kurtosis (log; heavier tails to the right)")
    ax.set_ylabel("SQNR(E4M3) - SQNR(INT8) (dB)")
    ax.set_title("Heavier tails favour exponent bits (Kuzmin et al. 2022): each point is one tensor")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict[str, Any], output: Path, *, overwrite: bool = False) -> Path:
    """formats_compare.json, .md and .png in `output`, written to a temporary directory, then renamed."""
    with atomic_directory(output, overwrite) as tmp:
        write_json(tmp / "formats_compare.json", result)
        (tmp / "formats_compare.md").write_text(markdown(result))
        plot(result, tmp / "formats_compare.png")
    return output

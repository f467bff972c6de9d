"""Terminal summary, Markdown, self-contained HTML, JSON and plots for `lowbit inspect` (no computation here).

The input is the result dict of `lowbit.analysis.inspect`: a `meta` block, the end-to-end KL (`kl`), the
calibration coverage verdict (`coverage`, None without use data) and one record per quantized layer, in
model order. Any number may be inf (an exact layer has infinite SQNR) or None (no attribution, no coverage
data): every renderer here shows those as "inf" / "-" and never fails on them.

`write_inspect_report` writes, atomically, report.json (the result as is, every number), report.md (with the
PNGs beside it) and report.html (one file: plots embedded as base64 PNG, CSS in the page, no scripts and no
external links, so it can be mailed or attached as is).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lowbit.checkpoint.io import atomic_directory, write_json
from lowbit.table import fmt, render

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["TOP", "approximation_line", "coverage_details", "coverage_line", "layer_table", "markdown", "render_plots", "html_report",
           "summary_text", "top_layers", "top_table", "write_inspect_report"]

TOP = 10  # layers in the terminal summary and the top-N tables
HIST_LAYERS = 4  # worst layers drawn in histograms.png
# sum_of_layers / all within these bounds: the one-at-a-time KLs "approximate" the all-quantized KL
CLOSE = 1.25
ROUGH = 2.0

PLOT_FILES = ("errors.png", "ranges.png", "histograms.png", "coverage.png")


# ---------------------------------------------------------------------------------------------- numbers


def _num(v: Any) -> float | None:
    """A finite-or-infinite float, or None for None / non-numbers / NaN."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _f(v: Any, spec: str = ".1f", scale: float = 1.0) -> str:
    """Format a number that may be None ("-"), inf ("inf") or NaN ("nan")."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x * scale, spec)


def _g(v: Any) -> str:
    """General number (KL, absmax): lowbit.table.fmt for finite floats, "-" / "inf" otherwise."""
    if v is None:
        return "-"
    x = _num(v)
    if x is None:
        return "nan" if isinstance(v, float) else str(v)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return fmt(x)


def _pct(v: Any) -> str:
    """A fraction as a percentage with enough digits for small rates (0.0123 -> 1.23, 2e-5 -> 0.002)."""
    x = _num(v)
    if x is None or math.isinf(x):
        return _f(v)
    p = 100 * x
    if p == 0:
        return "0"
    if abs(p) >= 10:
        return f"{p:.1f}"
    if abs(p) >= 0.01:
        return f"{p:.2f}"
    return f"{p:.1e}"


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _layers(result: dict[str, Any]) -> list[dict[str, Any]]:
    return list(result.get("layers") or [])


def _kl_total(result: dict[str, Any]) -> float | None:
    """The denominator of "share": kl.sum_of_layers, or the sum of the per-layer KLs when that is missing."""
    s = _num(_get(result, "kl", "sum_of_layers"))
    if s is not None and math.isfinite(s) and s > 0:
        return s
    vals = [x for x in (_num(layer.get("kl")) for layer in _layers(result)) if x is not None and math.isfinite(x)]
    total = sum(vals)
    return total if vals and total > 0 else None


def _share(layer: dict[str, Any], total: float | None) -> str:
    kl = _num(layer.get("kl"))
    if kl is None or total is None:
        return "-"
    return _f(100 * kl / total, ".1f")


def top_layers(result: dict[str, Any], n: int = TOP) -> list[dict[str, Any]]:
    """The n layers with the largest one-at-a-time KL, largest first (ties in model order); none without KL."""
    ranked = [(i, layer) for i, layer in enumerate(_layers(result)) if _num(layer.get("kl")) is not None]
    ranked.sort(key=lambda il: (-(_num(il[1].get("kl")) or 0.0), il[0]))
    return [layer for _, layer in ranked[:n]]


def _worst_for_hist(result: dict[str, Any], n: int = HIST_LAYERS) -> tuple[list[dict[str, Any]], str]:
    """Worst layers by KL; without attribution, by lowest output SQNR with both weights and inputs quantized."""
    top = top_layers(result, n)
    if top:
        return top, "KL"
    ranked = [(i, layer) for i, layer in enumerate(_layers(result))
              if _num(_get(layer, "output_sqnr_db", "both")) is not None]
    ranked.sort(key=lambda il: (_num(_get(il[1], "output_sqnr_db", "both")) or 0.0, il[0]))
    return [layer for _, layer in ranked[:n]], "output SQNR"


# ---------------------------------------------------------------------------------------------- text


def _shape(layer: dict[str, Any]) -> str:
    s = layer.get("shape")
    if isinstance(s, Sequence) and not isinstance(s, str) and len(s) == 2:
        return f"{s[1]}->{s[0]}"
    return "-"


def _row(layer: dict[str, Any], total: float | None) -> list[str]:
    o = layer.get("output_sqnr_db") or {}
    return [
        _f(_get(layer, "weight", "sqnr_db")),
        _f(o.get("weights")),
        _f(o.get("inputs")),
        _f(o.get("both")),
        _pct(layer.get("clip_rate")),
        _g(layer.get("kl")),
        _share(layer, total),
    ]


_ROW_HEAD = ["W SQNR dB", "out W dB", "out A dB", "out W+A dB", "clip %", "KL", "share %"]


def top_table(result: dict[str, Any], n: int = TOP) -> str:
    """The n layers by KL contribution: rank, name, KL, share of the sum, weight SQNR, output SQNRs, clip rate."""
    total = _kl_total(result)
    rows = []
    for layer in top_layers(result, n):
        r = _row(layer, total)
        rows.append([str(layer.get("name", "?")), r[5], r[6], *r[:5]])
    head = ["layer (largest KL first)", "KL", "share %", *_ROW_HEAD[:5]]
    return render(rows, head) if rows else "(no per-layer KL)"


def layer_table(result: dict[str, Any]) -> str:
    """Every layer in model order, every column."""
    total = _kl_total(result)
    rows = []
    for layer in _layers(result):
        cov = layer.get("coverage") or {}
        rows.append(
            [
                str(layer.get("name", "?")),
                _shape(layer),
                *_row(layer, total),
                _f(layer.get("kl_rank"), ".0f"),
                _g(layer.get("input_absmax")),
                _g(_get(layer, "act", "percentiles", "p99.9")),
                _pct(cov.get("outside_fraction")) if cov else "-",
                _f(cov.get("ratio"), ".2f") if cov else "-",
            ]
        )
    head = ["layer", "in->out", *_ROW_HEAD, "KL rank", "absmax", "p99.9", "outside %", "use/cal"]
    return render(rows, head) if rows else "(no layers)"


def coverage_line(result: dict[str, Any]) -> str:
    """One line: does the calibration set cover the activation ranges of the use data?"""
    cov = result.get("coverage")
    if not isinstance(cov, dict):
        return "calibration coverage: not measured (no use data given)"
    verdict = cov.get("verdict")
    if not verdict:  # no sentence from inspect: say it from the numbers
        verdict = ("the calibration set covers the use data" if cov.get("represents")
                   else "the calibration set does NOT represent the use data") + f" ({coverage_details(result)})"
    line = f"calibration coverage: {verdict}"
    worst = [str(w) for w in cov.get("worst") or []]
    if worst and cov.get("represents") is False:
        line += "; worst: " + ", ".join(worst[:3]) + (f" (+{len(worst) - 3})" if len(worst) > 3 else "")
    return line


def coverage_details(result: dict[str, Any]) -> str:
    """The coverage numbers: median and p90 out-of-range fraction over layers, layers flagged, worst layers."""
    cov = result.get("coverage")
    if not isinstance(cov, dict):
        return "no use data"
    parts = [f"per-channel excess over same-distribution text: median {_f(cov.get('median_excess'), '.1f')}x, "
             f"90th percentile {_f(cov.get('p90_excess'), '.1f')}x",
             f"median layer {_pct(cov.get('median_outside'))}% of its use-data inputs beyond the calibrated absmax",
             f"90th percentile {_pct(cov.get('p90_outside'))}%",
             f"{_f(cov.get('layers_flagged'), '.0f')} of {len(_layers(result))} layers flagged"]
    worst = [str(w) for w in cov.get("worst") or []]
    if worst:
        parts.append("worst: " + ", ".join(worst))
    return "; ".join(parts)


def approximation_line(result: dict[str, Any]) -> str:
    """One line: does the sum of the one-at-a-time KLs approximate the KL with every layer quantized?"""
    if not isinstance(result.get("kl"), dict) and all(_num(layer.get("kl")) is None for layer in _layers(result)):
        return "KL not measured (no attribution): cannot say whether per-layer KLs add up to the total"
    kl_all, kl_sum = _num(_get(result, "kl", "all")), _num(_get(result, "kl", "sum_of_layers"))
    if kl_sum is None:
        vals = [x for x in (_num(layer.get("kl")) for layer in _layers(result)) if x is not None]
        kl_sum = sum(vals) if vals else None
    if kl_all is None or kl_sum is None:
        return f"sum of per-layer KLs: {_g(kl_sum)}, all-quantized KL: {_g(kl_all)}: cannot compare"
    head = f"sum of per-layer KLs {_g(kl_sum)} vs all-quantized KL {_g(kl_all)}"
    if not (math.isfinite(kl_all) and math.isfinite(kl_sum)) or kl_all <= 0 or kl_sum <= 0:
        if kl_all == kl_sum:
            return f"{head}: equal"
        return f"{head}: cannot compare (zero or infinite)"
    r = kl_sum / kl_all
    if 1 / CLOSE <= r <= CLOSE:
        return (f"{head} (ratio {r:.2f}): the sum approximates it; layer errors add up nearly independently, "
                "so the ranking explains the total")
    if 1 / ROUGH <= r <= ROUGH:
        return (f"{head} (ratio {r:.2f}): the sum approximates it only roughly; layer errors interact, "
                "read the ranking as a guide, not a budget")
    why = "errors compound across layers" if r < 1 else "errors overlap or cancel across layers"
    return f"{head} (ratio {r:.2f}): the sum does NOT approximate it; {why}"


def _kl_context(result: dict[str, Any]) -> str:
    kl = result.get("kl") or {}
    return (f"per-token KL, {_f(kl.get('windows'), '.0f')} windows x "
            f"{_f(kl.get('seq_len'), '.0f')} tokens from {kl.get('source') or '?'}")


def summary_text(result: dict[str, Any], n: int = TOP) -> str:
    """What `lowbit inspect` prints: the top layers by KL, the coverage verdict and the additivity check."""
    layers = _layers(result)
    if top_layers(result, 1):
        src = _get(result, "kl", "source") or _get(result, "meta", "attribution")
        on = f", KL on {src}" if src else ""
        title = (f"Top {min(n, len(top_layers(result, n)))} of {len(layers)} layers by KL contribution "
                 f"(one layer quantized at a time{on}):")
        body = top_table(result, n)
    else:
        title = f"No per-layer KL for the {len(layers)} layers (attribution off)."
        body = ""
    lines = [title]
    if body:
        lines += [body]
    lines += ["", coverage_line(result), approximation_line(result)]
    return "\n".join(lines)


def _meta_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    meta = result.get("meta") or {}
    keys = ["model", "scheme", "calibration", "data", "attribution", "lowbit_version", "date"]
    keys += [k for k in meta if k not in keys]
    rows = [(k, "-" if meta.get(k) is None else str(meta.get(k))) for k in keys if k in meta]
    kl = result.get("kl")
    if isinstance(kl, dict):
        rows += [("KL (all layers quantized)", _g(kl.get("all"))), ("KL (sum of layers)", _g(kl.get("sum_of_layers"))),
                 ("KL measured on", _kl_context(result))]
    else:
        rows += [("KL", "not measured (no attribution)")]
    rows += [("layers", str(len(_layers(result))))]
    return rows


def markdown(result: dict[str, Any], plots: Sequence[str] | None = None, n: int = TOP) -> str:
    """report.md: meta, verdict, top-n table, the plots (PNG files beside it), then every layer."""
    if plots is None:
        plots = [p for p in PLOT_FILES if p != "coverage.png" or _has_coverage(result)]
    meta_rows = _meta_rows(result)
    parts = ["# lowbit inspect", "", "| | |", "|---|---|"]
    parts += [f"| {k} | {v.replace('|', '/')} |" for k, v in meta_rows]
    parts += ["", "## Verdict", "", f"- {coverage_line(result)}"]
    if isinstance(result.get("coverage"), dict):
        parts += [f"  - {coverage_details(result)}"]
    parts += [f"- {approximation_line(result)}", "",
              f"## Top {n} layers by KL contribution", "",
              "KL: the per-token KL with only that layer quantized; share: of the sum over layers. "
              "Output SQNR (dB) of the layer's output with quantized weights (W), inputs (A) or both; "
              "clip %: input values beyond the static clipping threshold.", "",
              "```", top_table(result, n), "```", ""]
    captions = {
        "errors.png": "Per-layer error: one-at-a-time KL (top), output SQNR (bottom)",
        "ranges.png": "Activation ranges: log10 per-channel absmax of each layer's input",
        "histograms.png": "Input histograms of the worst layers, with the clipping threshold",
        "coverage.png": "Use-data activations outside the calibrated range, per layer",
    }
    if plots:
        parts += ["## Plots", ""]
        for p in plots:
            parts += [f"![{captions.get(p, p)}]({p})", ""]
    parts += ["## Every layer (model order)", "", "```", layer_table(result), "```", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1400px;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.3em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{padding:.2em .6em;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f4f4f4;position:sticky;top:0}td.l,th.l{text-align:left}
tr:hover td{background:#fafafa}tr.top td{background:#fff4e5}
.meta td{text-align:left}.verdict li{margin:.3em 0}
.bad{color:#b00020;font-weight:600}.ok{color:#11772d;font-weight:600}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.scroll{overflow-x:auto}
"""


def _table_html(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1,
                row_class: Sequence[str] | None = None) -> str:
    def cell(tag: str, i: int, v: str) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(v)}</{tag}>"

    out = ["<div class=\"scroll\"><table>", "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"]
    for j, r in enumerate(rows):
        cls = f' class="{row_class[j]}"' if row_class and row_class[j] else ""
        out.append(f"<tr{cls}>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def html_report(result: dict[str, Any], pngs: dict[str, bytes], n: int = TOP) -> str:
    """report.html in one string: no scripts, no external resources; plots are data: URIs."""
    e = html.escape
    meta = "".join(f"<tr><th class=\"l\">{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _meta_rows(result))
    cov = result.get("coverage")
    cov_cls = "" if not isinstance(cov, dict) else (' class="ok"' if cov.get("represents") else ' class="bad"')
    total = _kl_total(result)
    top = top_layers(result, n)
    top_names = {id(layer) for layer in top}
    top_rows = []
    for k, layer in enumerate(top, 1):
        r = _row(layer, total)
        top_rows.append([str(k), str(layer.get("name", "?")), r[5], r[6], *r[:5]])
    all_rows, classes = [], []
    for layer in _layers(result):
        c = layer.get("coverage") or {}
        all_rows.append([str(layer.get("name", "?")), str(layer.get("kind", "-")), _shape(layer), *_row(layer, total),
                         _f(layer.get("kl_rank"), ".0f"), _g(layer.get("input_absmax")),
                         _g(_get(layer, "act", "percentiles", "p99.9")),
                         _pct(c.get("outside_fraction")) if c else "-", _f(c.get("ratio"), ".2f") if c else "-"])
        classes.append("top" if id(layer) in top_names else "")
    captions = {
        "errors.png": "Per-layer error, model order. Top: KL with only that layer quantized. Bottom: SQNR of the "
                      "layer output with quantized weights, inputs, or both (triangles at the top: exact, inf dB).",
        "ranges.png": "Activation ranges: log10 of the per-channel absmax of each layer's input (rows: layers in "
                      "model order, columns: input channels; one map per input width).",
        "histograms.png": "Histograms of |input| for the worst layers (log-log), with the static clipping threshold "
                          "(calibrated absmax) and, with use data, the use-data absmax.",
        "coverage.png": "Fraction of use-data input activations outside the calibrated range, per layer.",
    }
    figs = "\n".join(
        f'<figure><img alt="{e(name)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
        f"<figcaption>{e(captions.get(name, name))}</figcaption></figure>"
        for name, data in pngs.items()
    )
    title = e(f"lowbit inspect: {_get(result, 'meta', 'model') or '?'} ({_get(result, 'meta', 'scheme') or '?'})")
    body = [
        f"<h1>{title}</h1>",
        f"<table class=\"meta\">{meta}</table>",
        "<h2>Verdict</h2>",
        f"<ul class=\"verdict\"><li{cov_cls}>{e(coverage_line(result))}</li>"
        + (f"<li>{e(coverage_details(result))}</li>" if isinstance(cov, dict) else "")
        + f"<li>{e(approximation_line(result))}</li></ul>",
        f"<h2>Top {n} layers by KL contribution</h2>",
        "<p>KL: per-token KL with only that layer quantized; share: of the sum over layers. Output SQNR (dB) of the "
        "layer's output with quantized weights (W), inputs (A) or both; clip %: input values beyond the static "
        "clipping threshold.</p>",
        _table_html(["#", "layer", "KL", "share %", *_ROW_HEAD[:5]], top_rows, left=2) if top_rows
        else "<p>No per-layer KL.</p>",
        "<h2>Plots</h2>",
        figs,
        "<h2>Every layer (model order)</h2>",
        _table_html(["layer", "kind", "in->out", *_ROW_HEAD, "KL rank", "absmax", "p99.9", "outside %", "use/cal"],
                    all_rows, left=2, row_class=classes),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------------------------------------- plots


def _figure(w: float, h: float, layout: Literal["constrained"] | None = None) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout=layout)  # Agg canvas on savefig; no pyplot, no global state


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _block_ticks(layers: Sequence[dict[str, Any]], max_labels: int = 32) -> tuple[list[int], list[str], list[int]]:
    """Tick positions and labels at the first layer of each block (every k-th block) and all block starts."""
    starts: list[int] = []
    blocks: list[Any] = []
    for i, layer in enumerate(layers):
        b = layer.get("block")
        if not blocks or b != blocks[-1]:
            starts.append(i)
            blocks.append(b)
    step = max(1, math.ceil(len(starts) / max_labels))
    pos = [starts[k] for k in range(0, len(starts), step)]
    lab = [f"b{blocks[k]}" if blocks[k] is not None else "" for k in range(0, len(starts), step)]
    return pos, lab, starts


def _finite(xs: Sequence[float | None]) -> list[float]:
    return [x for x in xs if x is not None and math.isfinite(x)]


def _maybe_log(ax: Axes, values: Sequence[float | None], span: float = 100.0) -> None:
    pos = [x for x in _finite(values) if x > 0]
    if pos and max(pos) / min(pos) > span:
        ax.set_yscale("log", nonpositive="clip")


def _errors_png(result: dict[str, Any]) -> bytes:
    layers = _layers(result)
    n = len(layers)
    fig = _figure(min(24.0, max(10.0, 4 + 0.07 * n)), 7.5)
    ax_kl, ax_sq = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1.2]})
    idx = list(range(n))
    kls = [_num(layer.get("kl")) for layer in layers]
    finite_kl = [x if x is not None and math.isfinite(x) else 0.0 for x in kls]
    top = {id(layer) for layer in top_layers(result)}
    colors = ["#d9480f" if id(layer) in top else "#4c6ef5" for layer in layers]
    if _finite(kls):
        ax_kl.bar(idx, finite_kl, width=0.85, color=colors)
        _maybe_log(ax_kl, kls)
        ax_kl.set_title(f"KL with one layer quantized at a time (orange: top {TOP}); "
                        f"all quantized: {_g(_get(result, 'kl', 'all'))}, sum: {_g(_get(result, 'kl', 'sum_of_layers'))}",
                        fontsize=10)
    else:
        ax_kl.text(0.5, 0.5, "no per-layer KL attribution", ha="center", va="center", transform=ax_kl.transAxes)
        ax_kl.set_title("KL with one layer quantized at a time", fontsize=10)
    ax_kl.set_ylabel("KL (nats/token)")
    ax_kl.grid(alpha=0.3, axis="y")

    series = {w: [_num(_get(layer, "output_sqnr_db", w)) for layer in layers] for w in ("weights", "inputs", "both")}
    fin = [x for s in series.values() for x in _finite(s)]
    cap = (max(fin) + 5.0) if fin else 60.0
    style = {"weights": ("weights quantized", "#2b8a3e"), "inputs": ("inputs quantized", "#1971c2"),
             "both": ("weights and inputs", "#c92a2a")}
    for w, vals in series.items():
        label, c = style[w]
        ys = [v if v is not None and math.isfinite(v) else math.nan for v in vals]
        ax_sq.plot(idx, ys, label=label, color=c, linewidth=1, marker=".", markersize=3)
        inf_idx = [i for i, v in enumerate(vals) if v is not None and math.isinf(v) and v > 0]
        if inf_idx:
            ax_sq.scatter(inf_idx, [cap] * len(inf_idx), marker="^", color=c, s=18)
    ax_sq.set_ylabel("output SQNR (dB)")
    ax_sq.set_title("SQNR of each layer's output (higher is better)", fontsize=10)
    ax_sq.grid(alpha=0.3)
    ax_sq.legend(ncol=3, fontsize=8, loc="best")
    pos, lab, starts = _block_ticks(layers)
    for s in starts[1:]:
        for ax in (ax_kl, ax_sq):
            ax.axvline(s - 0.5, color="#ccc", linewidth=0.5, zorder=0)
    ax_sq.set_xticks(pos, lab, fontsize=7, rotation=90 if len(pos) > 20 else 0)
    ax_sq.set_xlabel("layers in model order (ticks: first layer of each block)")
    if n:
        ax_sq.set_xlim(-0.7, n - 0.3)
    fig.tight_layout()
    return _png(fig)


def _ranges_png(result: dict[str, Any]) -> bytes:
    import numpy as np

    groups: dict[int, list[dict[str, Any]]] = {}
    for layer in _layers(result):
        ch = layer.get("channel_absmax") or []
        if len(ch):
            groups.setdefault(len(ch), []).append(layer)
    if not groups:
        fig = _figure(8, 2)
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no per-channel absmax recorded", ha="center", va="center")
        ax.set_axis_off()
        return _png(fig)

    mats = {}
    for width, ls in groups.items():
        m = np.array([[np.nan if v is None else float(v) for v in layer["channel_absmax"]] for layer in ls], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            m = np.where(m > 0, np.log10(np.where(m > 0, m, 1.0)), np.nan)
        m[~np.isfinite(m)] = np.nan
        mats[width] = m
    fin = np.concatenate([m[np.isfinite(m)] for m in mats.values()])
    vmin, vmax = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    if vmax <= vmin:
        vmax = vmin + 1.0
    rows = [len(ls) for ls in groups.values()]
    ratios = [max(r, 0.15 * max(rows), 3) for r in rows]
    fig = _figure(13, min(4 + 0.06 * sum(rows), 22) + 1.2 * len(groups), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False, gridspec_kw={"height_ratios": ratios})[:, 0]
    from matplotlib import colormaps

    cmap = colormaps["magma"].with_extremes(bad="#bbbbbb")
    im = None
    for ax, (width, ls) in zip(axes, groups.items(), strict=True):
        im = ax.imshow(mats[width], aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
        kinds = sorted({str(layer.get("kind")) for layer in ls if layer.get("kind")})
        ax.set_title(f"input width {width}: {len(ls)} layers ({'/'.join(kinds)})", fontsize=10)
        ax.set_xlabel("input channel")
        if len(ls) <= 16:
            ax.set_yticks(range(len(ls)), [str(layer.get("name", "?")) for layer in ls], fontsize=6)
        else:
            pos, lab, _ = _block_ticks(ls, max_labels=24)
            ax.set_yticks(pos, lab, fontsize=7)
            ax.set_ylabel("layers (model order)")
    if im is not None:
        fig.colorbar(im, ax=list(axes), label="log10 per-channel absmax of the input", shrink=0.9)
    return _png(fig)


def _hist_bins(layer: dict[str, Any]) -> tuple[list[float], list[float], list[str], bool] | None:
    """Drawable histogram of |x|: (edges, counts, notes, log x), or None without a usable histogram.

    Open-ended bins ([0, e1) for zeros and tiny values, [en, inf) beyond the last edge) cannot be drawn on
    a log axis; their counts become notes. Empty bins at both ends are trimmed.
    """
    raw_edges = [_num(x) for x in _get(layer, "hist", "edges") or []]
    counts = [_num(x) for x in _get(layer, "hist", "counts") or []]
    edges = [x for x in raw_edges if x is not None]
    if not counts or len(edges) != len(counts) + 1 or len(raw_edges) != len(edges):
        return None
    bins = [(lo, hi, c if c is not None and math.isfinite(c) else 0.0)
            for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]
    inner = [b for b in bins if 0 < b[0] < b[1] < math.inf]
    log_x = bool(inner)
    if not inner:
        if not all(math.isfinite(lo) and math.isfinite(hi) for lo, hi, _ in bins):
            return None
        inner = bins
    lo0, hi0 = inner[0][0], inner[-1][1]
    under = sum(c for lo, _, c in bins if lo < lo0)
    over = sum(c for _, hi, c in bins if hi > hi0)
    notes = []
    if under:
        notes.append(f"{under:.0f} below {lo0:g}" + (" (zeros incl.)" if log_x else ""))
    if over:
        notes.append(f"{over:.0f} beyond {hi0:g}")
    nz = [i for i, b in enumerate(inner) if b[2] > 0]
    if nz:
        inner = inner[max(nz[0] - 1, 0): nz[-1] + 2]
    return [b[0] for b in inner] + [inner[-1][1]], [b[2] for b in inner], notes, log_x


def _histograms_png(result: dict[str, Any]) -> bytes:
    from matplotlib.ticker import NullLocator  # minor log ticks: slow to lay out, and clutter here

    worst, by = _worst_for_hist(result)
    k = max(1, len(worst))
    cols = 2 if k > 1 else 1
    nrows = math.ceil(k / cols)
    fig = _figure(6.2 * cols, 3.6 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    if not worst:
        axes[0].text(0.5, 0.5, "no layers", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, layer in zip(axes, worst, strict=False):
        h = _hist_bins(layer)
        xs: list[float] = []
        if h is not None:
            e, c, notes, log_x = h
            ax.stairs(c, e, fill=True, color="#74c0fc", edgecolor="#1971c2", linewidth=0.6)
            if max(c) > 0:
                ax.set_yscale("log", nonpositive="clip")
                ax.yaxis.set_minor_locator(NullLocator())
                ax.set_ylim(0.5, max(c) * 20)  # headroom for the legend
            if log_x:
                ax.set_xscale("log")
                ax.xaxis.set_minor_locator(NullLocator())
            xs = [e[0], e[-1]]
            if notes:
                ax.text(0.99, 0.97, "\n".join(notes), ha="right", va="top", fontsize=7, transform=ax.transAxes)
        else:
            ax.text(0.5, 0.5, "no histogram", ha="center", va="center", transform=ax.transAxes)
        thr = _num(layer.get("input_absmax"))
        if thr is not None and math.isfinite(thr) and thr > 0:
            ax.axvline(thr, color="#c92a2a", linewidth=1.4, label=f"clipping threshold (calib absmax) {_g(thr)}")
            xs.append(thr)
        use = _num(_get(layer, "coverage", "use_absmax"))
        if use is not None and math.isfinite(use) and use > 0:
            ax.axvline(use, color="#e67700", linewidth=1.4, linestyle="--", label=f"use-data absmax {_g(use)}")
            xs.append(use)
        if xs and h is not None:
            lo, hi = min(xs), max(xs)
            ax.set_xlim(lo / 1.5 if ax.get_xscale() == "log" else lo, hi * 1.5)
        ax.set_title(f"{layer.get('name', '?')}: KL {_g(layer.get('kl'))}, clip {_pct(layer.get('clip_rate'))}%",
                     fontsize=9)
        ax.set_xlabel("|input|")
        ax.set_ylabel("count (log)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes[len(worst):]:
        ax.set_axis_off()
    fig.suptitle(f"Input histograms of the {len(worst)} worst layers by {by}", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def _coverage_png(result: dict[str, Any]) -> bytes:
    layers = _layers(result)
    n = len(layers)
    fig = _figure(min(24.0, max(10.0, 4 + 0.07 * n)), 4.2)
    ax = fig.subplots()
    fr = [_num(_get(layer, "coverage", "outside_fraction")) for layer in layers]
    worst = {str(w) for w in _get(result, "coverage", "worst") or []}
    colors = ["#c92a2a" if str(layer.get("name")) in worst else "#868e96" for layer in layers]
    ax.bar(range(n), [x if x is not None and math.isfinite(x) else 0.0 for x in fr], width=0.85, color=colors)
    _maybe_log(ax, fr)
    ax.set_ylabel("fraction outside calibrated range")
    ax.set_title(f"Use-data input activations beyond the calibrated absmax (red: worst layers); "
                 f"{coverage_line(result).split(' (')[0]}", fontsize=9)
    pos, lab, starts = _block_ticks(layers)
    for s in starts[1:]:
        ax.axvline(s - 0.5, color="#ddd", linewidth=0.5, zorder=0)
    ax.set_xticks(pos, lab, fontsize=7, rotation=90 if len(pos) > 20 else 0)
    ax.set_xlabel("layers in model order")
    ax.grid(alpha=0.3, axis="y")
    if n:
        ax.set_xlim(-0.7, n - 0.3)
    fig.tight_layout()
    return _png(fig)


def _has_coverage(result: dict[str, Any]) -> bool:
    return isinstance(result.get("coverage"), dict) or any(
        isinstance(layer.get("coverage"), dict) for layer in _layers(result))


def render_plots(result: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes by file name: errors, ranges, histograms, and coverage when the result has coverage data."""
    out = {
        "errors.png": _errors_png(result),
        "ranges.png": _ranges_png(result),
        "histograms.png": _histograms_png(result),
    }
    if _has_coverage(result):
        out["coverage.png"] = _coverage_png(result)
    return out


# ---------------------------------------------------------------------------------------------- files


def write_inspect_report(result: dict[str, Any], output: Path, *, overwrite: bool = False, top: int = TOP) -> Path:
    """report.json, report.md (+ PNGs) and a self-contained report.html in `output`, atomically.

    Raises LowbitError if `output` exists and `overwrite` is false (before any plotting).
    """
    output = Path(output)
    with atomic_directory(output, overwrite) as tmp:
        write_json(tmp / "report.json", result)
        pngs = render_plots(result)
        for name, data in pngs.items():
            (tmp / name).write_bytes(data)
        (tmp / "report.md").write_text(markdown(result, list(pngs), n=top))
        (tmp / "report.html").write_text(html_report(result, pngs, n=top))
    return output

"""The `lowbit inspect` report renderer on a synthetic result: files, self-contained HTML, tables, summary."""

from __future__ import annotations

import base64
import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lowbit.analysis import inspect_report
from lowbit.analysis.inspect_report import (
    _hist_bins,
    approximation_line,
    coverage_line,
    layer_table,
    markdown,
    summary_text,
    top_layers,
    write_inspect_report,
)
from lowbit.errors import LowbitError

HIDDEN, INTER = 576, 1536
KINDS = [("self_attn", "q_proj", 576), ("self_attn", "k_proj", 192), ("self_attn", "v_proj", 192),
         ("self_attn", "o_proj", 576), ("mlp", "gate_proj", INTER), ("mlp", "up_proj", INTER),
         ("mlp", "down_proj", HIDDEN)]


def synthetic_result(blocks: int = 2, coverage: bool = True, seed: int = 0) -> dict[str, Any]:
    """A SmolLM2-135M-shaped result (hidden 576, MLP 1536): 7 layers per block, two input widths."""
    rng = np.random.default_rng(seed)
    layers: list[dict[str, Any]] = []
    for b in range(blocks):
        for mod, kind, out in KINDS:
            width = INTER if kind == "down_proj" else HIDDEN
            ch = np.abs(rng.standard_normal(width)) * (8.0 if kind == "down_proj" else 1.5) + 0.05
            ch[rng.integers(0, width, 3)] *= 40  # outlier channels
            absmax = float(ch.max())
            x = np.abs(rng.standard_t(3, 4000)) * float(np.median(ch)) / 2
            x[:40] = 0.0  # exact zeros (e.g. after a ReLU-like gate)
            # the layout of lowbit.analysis.inspect: [0, 1e-6 .. 1e4 (8 per decade), inf]
            inner = np.logspace(-6, 4, 81)
            counts = np.bincount(np.searchsorted(inner, x, side="right"), minlength=82)
            edges = [0.0, *inner.tolist(), math.inf]
            kl = float(rng.uniform(1e-4, 2e-3) * (25 if kind == "down_proj" and b == blocks - 1 else 1))
            cov = None
            if coverage:
                outside = float(rng.uniform(0, 2e-4) * (50 if kind == "down_proj" else 1))
                use = absmax * (1.0 + 50 * outside)
                cov = {"outside_fraction": outside, "use_absmax": use, "ratio": use / absmax,
                       "channels_outside": float(rng.uniform(0, 0.01))}
            w_sqnr = float(rng.uniform(28, 34))
            layers.append({
                "name": f"model.layers.{b}.{mod}.{kind}", "kind": kind, "block": b, "shape": [out, width],
                "params": out * width,
                "weight": {"sqnr_db": w_sqnr, "mse": float(10 ** (-w_sqnr / 10) * 1e-3)},
                "output_sqnr_db": {"weights": w_sqnr - 1, "inputs": float(rng.uniform(20, 30)),
                                   "both": float(rng.uniform(18, 27))},
                "input_absmax": absmax, "input_scale": absmax / 448.0, "clip_rate": float(rng.uniform(0, 1e-4)),
                "act": {"min": -absmax, "max": absmax * 0.9,
                        "percentiles": {"p0.1": -absmax / 5, "p1": -absmax / 9, "p50": 0.001,
                                        "p99": absmax / 9, "p99.9": absmax / 5}},
                "channel_absmax": [float(v) for v in ch],
                "hist": {"edges": edges, "counts": [int(c) for c in counts]},
                "kl": kl, "kl_rank": None, "coverage": cov,
            })
    # edge cases: an exact layer (inf SQNR), a layer without attribution, a layer without a scale
    layers[2]["output_sqnr_db"]["weights"] = math.inf
    layers[2]["weight"] = {"sqnr_db": math.inf, "mse": 0.0}
    layers[3]["kl"] = None
    layers[3]["input_scale"] = None
    ranked = sorted((i for i, layer in enumerate(layers) if layer["kl"] is not None), key=lambda i: -layers[i]["kl"])
    for r, i in enumerate(ranked, 1):
        layers[i]["kl_rank"] = r
    total = sum(layer["kl"] for layer in layers if layer["kl"] is not None)
    flagged = [layer["name"] for layer in layers if layer["coverage"] and layer["coverage"]["outside_fraction"] > 1e-3]
    verdict = (f"NOT REPRESENTATIVE: {len(flagged)} of {len(layers)} layers clip more than 1e-05 of the use data's "
               "inputs (median 1.2e-04, 90th percentile 4.0e-03); calibrate on text like the use data")
    return {
        "meta": {"model": "HuggingFaceTB/SmolLM2-135M", "scheme": "fp8-static", "calibration": "128 x 512 tokens, pile",
                 "data": "my_prompts.jsonl" if coverage else None, "attribution": "one-at-a-time",
                 "lowbit_version": "0.1.0", "date": "2025-01-01T00:00:00"},
        "kl": {"all": total * 1.1, "sum_of_layers": total, "windows": 16, "seq_len": 512, "source": "wikitext-2 test"},
        "coverage": None if not coverage else {
            "verdict": verdict, "represents": not flagged, "median_outside": 1.2e-4, "p90_outside": 4e-3,
            "layers_flagged": len(flagged),
            "worst": [la["name"] for la in sorted(layers, key=lambda la: -la["coverage"]["outside_fraction"])[:5]]},
        "layers": layers,
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    result = synthetic_result()
    out = tmp_path_factory.mktemp("inspect") / "report"
    assert write_inspect_report(result, out) == out
    return result, out


def _no_external(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script\b", page, re.I)  # no scripts at all, inline or not
    assert not re.search(r"<link\b", page, re.I) and "@import" not in page and "url(" not in page
    for attr in re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.I):
        assert attr.startswith("data:image/png;base64,"), attr[:60]


def test_writes_every_file_and_json_round_trips(written: tuple[dict[str, Any], Path]) -> None:
    result, out = written
    for name in ("report.json", "report.md", "report.html", "errors.png", "ranges.png", "histograms.png",
                 "coverage.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    back = json.loads((out / "report.json").read_text())
    assert back == result  # inf survives as Infinity
    assert back["layers"][2]["weight"]["sqnr_db"] == math.inf
    assert not list(out.parent.glob(".report.lowbit-tmp-*"))


def test_html_is_self_contained_with_embedded_plots(written: tuple[dict[str, Any], Path]) -> None:
    result, out = written
    page = (out / "report.html").read_text()
    images = re.findall(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4
    assert all(base64.b64decode(b).startswith(b"\x89PNG") for b in images)
    assert base64.b64decode(images[0]) == (out / "errors.png").read_bytes()
    _no_external(page)
    for layer in result["layers"]:
        assert layer["name"] in page
    assert "inf" in page and "NOT REPRESENTATIVE" in page


def test_markdown_has_every_layer_and_the_plots(written: tuple[dict[str, Any], Path]) -> None:
    result, out = written
    md = (out / "report.md").read_text()
    table = md.split("## Every layer")[1]
    for layer in result["layers"]:
        assert re.search(rf"^{re.escape(layer['name'])}\s", table, re.M), layer["name"]
    for png in ("errors.png", "ranges.png", "histograms.png", "coverage.png"):
        assert f"]({png})" in md
    assert "HuggingFaceTB/SmolLM2-135M" in md and "fp8-static" in md
    assert "## Top 10 layers by KL contribution" in md
    assert coverage_line(result) in md and approximation_line(result) in md
    row3 = next(line for line in table.splitlines() if line.startswith(result["layers"][3]["name"]))
    assert " - " in row3  # no KL for that layer
    row2 = next(line for line in table.splitlines() if line.startswith(result["layers"][2]["name"]))
    assert " inf " in row2


def test_summary_lists_top_layers_in_kl_order(written: tuple[dict[str, Any], Path]) -> None:
    result, _ = written
    text = summary_text(result)
    expected = sorted((layer for layer in result["layers"] if layer["kl"] is not None), key=lambda lr: -lr["kl"])[:10]
    rows = [line.split() for line in text.splitlines() if line.startswith("model.layers.")]
    assert [r[0] for r in rows] == [layer["name"] for layer in expected]
    assert [layer["name"] for layer in top_layers(result)] == [r[0] for r in rows]
    shares = [float(r[2]) for r in rows]
    assert shares == sorted(shares, reverse=True) and shares[0] > 10  # the last down_proj dominates
    assert "calibration coverage: NOT REPRESENTATIVE: 2 of 14 layers" in text
    assert "worst: " + ", ".join(result["coverage"]["worst"][:3]) + " (+2)" in text
    assert "sum of per-layer KLs" in text and "approximates it" in text and "ratio 0.91" in text


def test_overwrite_is_refused_unless_asked(written: tuple[dict[str, Any], Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    result, out = written
    before = (out / "report.json").read_text()
    with pytest.raises(LowbitError, match="already exists"):
        write_inspect_report(result, out)
    assert (out / "report.json").read_text() == before
    monkeypatch.setattr(inspect_report, "render_plots", lambda r: {})  # the plots are tested above
    other = out.parent / "again"
    write_inspect_report(result, other)
    small = copy.deepcopy(result)
    small["meta"]["model"] = "replaced"
    write_inspect_report(small, other, overwrite=True)
    assert json.loads((other / "report.json").read_text())["meta"]["model"] == "replaced"


def test_without_coverage_or_attribution(tmp_path: Path) -> None:
    result = synthetic_result(blocks=1, coverage=False, seed=1)
    for layer in result["layers"]:
        layer["kl"] = layer["kl_rank"] = None
    result["kl"] = None  # what inspect writes with attribution off
    result["meta"]["attribution"] = ""
    result["layers"][0]["channel_absmax"] = []  # no channel data for one layer
    result["layers"][1]["hist"] = {"edges": [], "counts": []}
    out = write_inspect_report(result, tmp_path / "r")
    assert not (out / "coverage.png").exists()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    _no_external(page)
    assert "coverage.png" not in (out / "report.md").read_text()
    text = summary_text(result)
    assert "No per-layer KL" in text and "coverage: not measured" in text and "KL not measured" in text
    assert "not measured (no attribution)" in (out / "report.md").read_text()
    assert all(layer["name"] in layer_table(result) for layer in result["layers"])
    assert "coverage.png" not in markdown(result)


def test_approximation_line_tiers() -> None:
    def line(all_: float | None, s: float | None) -> str:
        return approximation_line({"kl": {"all": all_, "sum_of_layers": s}, "layers": []})

    assert "the sum approximates it;" in line(0.010, 0.011)
    assert "only roughly" in line(0.010, 0.017)
    assert "does NOT" in line(0.010, 0.001) and "compound" in line(0.010, 0.001)
    assert "overlap" in line(0.001, 0.010)
    assert "cannot compare" in line(None, 0.01) and "cannot compare" in line(0.0, 0.01)
    assert "cannot compare" in line(math.inf, 0.01)


def test_odd_values_never_crash() -> None:
    result = synthetic_result(blocks=1, seed=2)
    layer = result["layers"][0]
    layer["output_sqnr_db"] = {"weights": math.inf, "inputs": math.nan, "both": None}
    layer["clip_rate"] = None
    layer["kl"] = math.inf
    layer["shape"] = None
    layer["hist"] = {"edges": [1e-3, 1e-2, 1e-1, 1.0, 10.0], "counts": [0, 5, 0, 2]}  # finite edges only
    result["layers"][1]["hist"] = {"edges": [0.0, 1.0, 2.0], "counts": [3, 1]}  # linear, from zero
    result["layers"][2]["hist"] = {"edges": [0.0, 1.0, math.inf], "counts": [3]}  # malformed
    result["coverage"] = {"verdict": None, "represents": True}
    text = summary_text(result)
    assert layer["name"] in text and "inf" in text and "nan" in text
    assert "covers the use data" in coverage_line(result)
    assert layer["name"] in layer_table(result) and layer["name"] in markdown(result)
    assert inspect_report._histograms_png(result).startswith(b"\x89PNG")  # open, finite, linear and bad bins


def test_histogram_open_bins_become_notes() -> None:
    layer = synthetic_result(blocks=1)["layers"][0]
    h = _hist_bins(layer)
    assert h is not None
    edges, counts, notes, log_x = h
    assert log_x and 0 < edges[0] and math.isfinite(edges[-1]) and len(edges) == len(counts) + 1
    assert counts[0] == 0 and counts[-1] == 0 and min(counts[1], counts[-2]) > 0  # trimmed to one empty bin
    assert sum(counts) + 40 <= sum(layer["hist"]["counts"])  # the zeros are outside
    assert notes and notes[0].startswith("40 below") and "zeros" in notes[0]
    assert _hist_bins({"hist": {"edges": [0.0, 1.0, 2.0], "counts": [3, 1]}}) == (
        [1.0, 2.0], [1], ["3 below 1 (zeros incl.)"], True)
    assert _hist_bins({"hist": {"edges": [0.0, 1.0], "counts": [3]}}) == ([0.0, 1.0], [3], [], False)  # linear
    assert _hist_bins({"hist": None}) is None and _hist_bins({"hist": {"edges": [1.0], "counts": [1, 2]}}) is None

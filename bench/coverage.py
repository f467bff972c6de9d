"""Calibration coverage on smollm2-135m: does `lowbit inspect` flag calibration sets that do not
represent the use data, and only those? (issue 4)

    .venv/bin/python bench/coverage.py [--samples 16] [--windows 16]

Use data: wikitext-2 test (prose). Calibration sets, each `--samples` windows of 512 tokens:
- prose: groups_merged.txt (mixed-domain prose), the recommended calibration text -> must pass;
- prose, other source: the builtin docstring text -> must pass;
- code: Python source files of the standard library -> must be flagged;
- narrow domain: the text of the CPython licence, repeated -> must be flagged.
Writes bench/results/coverage.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LOWBIT_DATA_DIR", REPO.parent / "shared" / "data"))


def code_text() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = ["json/decoder.py", "argparse.py", "dataclasses.py", "textwrap.py", "heapq.py", "fractions.py"]
    return "\n\n".join((stdlib / f).read_text() for f in files)


def licence_text() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lic = stdlib / "LICENSE.txt"
    text = lic.read_text() if lic.exists() else "Permission is hereby granted, free of charge, to any person. " * 200
    return "\n\n".join([text] * 20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from accuracy import machine  # type: ignore[import-not-found]

    from lowbit.analysis.inspect import EXCESS_FLAG, LAYERS_FLAG, inspect_model
    from lowbit.calibration.data import CalibConfig, load_calibration, read_text_source, token_windows
    from lowbit.models import load_model
    from lowbit.scheme import get_scheme

    torch.manual_seed(0)
    model, tok, _ = load_model(None)
    text, _ = read_text_source(str(DATA / "wikitext-2-raw" / "wiki.test.raw"))
    use = token_windows(text, tok, 512, args.windows)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "code.txt").write_text(code_text())
    (tmp / "licence.txt").write_text(licence_text())
    sets = [
        ("prose: groups_merged.txt", str(DATA / "calibration" / "groups_merged.txt"), True),
        ("prose: builtin docstrings", "builtin", True),
        ("code: Python stdlib sources", str(tmp / "code.txt"), False),
        ("narrow: the CPython licence", str(tmp / "licence.txt"), False),
    ]
    rows = []
    for label, src, expected in sets:
        calib = load_calibration(CalibConfig(source=src, num_samples=args.samples, max_length=512, pack=True), tok)
        res = inspect_model(model, get_scheme("fp8"), calib.samples, attribution_windows=None, use_windows=use, progress=False)
        cov = res["coverage"]
        ratios = sorted(layer["coverage"]["ratio"] for layer in res["layers"])
        excess = sorted(layer["coverage"]["channel_excess_ratio"] for layer in res["layers"])
        row = {"calibration": label, "expected_represents": expected, **cov,
               "median_absmax_ratio": ratios[len(ratios) // 2], "samples": len(calib.samples),
               "channel_excess_median": excess[len(excess) // 2], "channel_excess_p90": excess[int(0.9 * len(excess))],
               "per_layer_channel_excess": {la["name"]: la["coverage"]["channel_excess_ratio"] for la in res["layers"]}}
        rows.append(row)
        print(row["calibration"], "->", cov["verdict"], flush=True)
    out = {"date": str(date.today()), "machine": machine(), "command": "python bench/coverage.py",
           "use_data": f"wikitext-2 test, {args.windows} x 512 tokens", "thresholds": {"channel_excess": EXCESS_FLAG, "layers": LAYERS_FLAG},
           "rows": rows}
    (REPO / "bench" / "results" / "coverage.json").write_text(json.dumps(out, indent=2) + "\n")
    print("\n| calibration set | layers flagged (of 210) | median outside | 90th pct outside | channel excess median / p90 | verdict | expected |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        v = "represents" if r["represents"] else "NOT representative"
        e = "represents" if r["expected_represents"] else "NOT representative"
        print(f"| {r['calibration']} | {r['layers_flagged']} | {r['median_outside']:.1e} | {r['p90_outside']:.1e} | "
              f"{r['channel_excess_median']:.1f} / {r['channel_excess_p90']:.1f} | {v} | {e} |")


if __name__ == "__main__":
    main()

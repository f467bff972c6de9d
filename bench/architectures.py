"""The architecture matrix: 15 text architectures (dense and Mixture-of-Experts) and Gemma-3 with a
vision tower, tiny random models built from configs (no download), each quantized to fp8 and
fp8-dynamic, saved, and loaded back by lowbit and by transformers.

    PYTHONPATH=src .venv/bin/python bench/architectures.py [--only qwen3_moe,mixtral]

The cases, their checks and tolerances are tests/test_architectures.py's (`run_case`, whose
docstring explains each comparison). Per case: lowbit's own checks (reload bit-exact, every expert
quantized under vLLM's per-expert names, routers and vision tower ignored, checkpoint smaller), then
transformers': loads every tensor; max |logit difference| to lowbit in bf16 (experts run as
transformers runs them, and lowbit's full model), in float32, and in bf16 with weights only;
checkpoint size against the bf16 parameters; share of expert weights in FP8; calibration tokens per
expert. Writes bench/results/architectures.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.test_architectures holds the cases


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated architectures")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("lowbit").setLevel(logging.ERROR)
    import compressed_tensors
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from accuracy import machine  # type: ignore[import-not-found]

    import lowbit
    from tests import test_architectures as T

    archs = args.only.split(",") if args.only else list(T.ARCHS)
    unknown = [a for a in archs if a not in T.ARCHS]
    if unknown:
        sys.exit(f"unknown architecture(s) {unknown}; choose from {', '.join(T.ARCHS)}")
    work = Path(tempfile.mkdtemp(prefix="lowbit-archs-"))
    rows = []
    t0 = time.perf_counter()
    for arch in archs:
        for scheme in T.SCHEMES:
            try:
                r = T.run_case(arch, scheme, work)
                row = r.to_dict()
            except Exception as e:  # a case that cannot run at all is a row too, with its error
                row = {"arch": arch, "scheme": scheme, "error": f"{type(e).__name__}: {e}"}
            spec = T.ARCHS[arch]
            known = spec.hf_load_fails or T.TRANSFORMERS_KNOWN.get((arch, scheme))
            row["transformers_known_failure"] = None if known is None else {"short": known.short, "reason": known.reason}
            rows.append(row)
            print(f"{arch} {scheme}: lowbit {row.get('lowbit_failures', row.get('error'))}, "
                  f"transformers {row.get('transformers_failures')}", flush=True)
    seconds = time.perf_counter() - t0

    out = {
        "date": str(date.today()), "machine": machine(), "command": "PYTHONPATH=src python bench/architectures.py",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__, "lowbit": lowbit.__version__,
        "calibration": f"{T.CALIBRATION[0]} random samples x {T.CALIBRATION[1]} tokens",
        "eval_ids": list(T.EVAL_IDS.shape),
        "tolerances": {"reload": T.RELOAD_ATOL, "transformers_fp32": T.TRANSFORMERS_FP32_ATOL,
                       "transformers_bf16_weights_only": T.TRANSFORMERS_BF16_WEIGHTS_ATOL,
                       "size_ratio_max": T.SIZE_RATIO_MAX},
        "seconds": seconds, "rows": rows,
    }
    if not args.only:
        (REPO / "bench" / "results" / "architectures.json").write_text(json.dumps(out, indent=2) + "\n")

    print("\n| architecture | scheme | lowbit | transformers | max Δ lowbit reload | max Δ transformers bf16: "
          "experts as it runs them / full lowbit | max Δ transformers fp32 | max Δ transformers bf16 weights only | "
          "checkpoint / bf16 params | expert weights in FP8 | tokens per expert min / max |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    notes: dict[str, str] = {}
    for row in rows:
        if "error" in row:
            print(f"| {row['arch']} | {row['scheme']} | ERROR: {row['error'][:120]} | | | | | | | | |")
            continue
        lowbit_ok = "pass" if not row["lowbit_failures"] else "FAIL: " + "; ".join(row["lowbit_failures"])[:120]
        known = row["transformers_known_failure"]
        if not row["transformers_failures"]:
            hf = "pass" + (" (expected to fail!)" if known else "")
        elif known:
            notes.setdefault(known["short"], known["reason"])
            hf = f"fail [{list(notes).index(known['short']) + 1}]: {known['short']}"
        else:
            hf = "FAIL: " + "; ".join(row["transformers_failures"])[:120]
        pct = row["expert_quantized_pct"]
        tok = row["tokens_per_expert"]
        experts_in = {"quantized": " (experts quantized)", "unquantized": ""}.get(row["hf_expert_inputs"] or "", "")
        print(f"| {row['arch']} | {row['scheme']} | {lowbit_ok} | {hf} | {fmt(row['reload_diff'])} | "
              f"{fmt(row['hf_diff'])} / {fmt(row['hf_diff_full'])}{experts_in} | {fmt(row['hf_diff_fp32'])} | "
              f"{fmt(row['hf_diff_weights'])} | {row['size_ratio']:.2f} | {'-' if pct is None else f'{pct:.0f}%'} | "
              f"{'-' if tok is None else f'{tok[0]} / {tok[1]}'} |")
    for i, (short, reason) in enumerate(notes.items()):
        print(f"\n[{i + 1}] {short}: {reason}")
    print(f"\n{len(rows)} cases in {seconds:.1f} s on {machine()}")


if __name__ == "__main__":
    main()

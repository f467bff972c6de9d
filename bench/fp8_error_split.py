"""Where static FP8's error on smollm2-135m comes from: weights alone, activations alone, both (issue 6).

    PYTHONPATH=src python bench/fp8_error_split.py [--windows 10]

Round-to-nearest static FP8 (the default `fp8` scheme, 64 x 512 calibration windows of
../shared/data/calibration/groups_merged.txt), evaluated by lowbit's bf16 emulation against the
original on the first windows of ../shared/data/wikitext-2-raw/wiki.test.raw, three ways: as
quantized; with the activations left unquantized (weights' error alone); with the original bf16
weights and quantized activations (activations' error alone). No weight algorithm (GPTQ, AWQ) can
take the result below the activations-alone row. Writes bench/results/fp8_error_split.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from accuracy import CALIB, WIKI, machine  # type: ignore[import-not-found]  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=10)
    args = ap.parse_args()
    from lowbit.algorithms.ptq import quantize_model
    from lowbit.calibration.data import CalibConfig, load_calibration, read_text_source, token_windows
    from lowbit.eval.metrics import compare_logits
    from lowbit.models import load_model
    from lowbit.nn import QuantLinear
    from lowbit.scheme import get_scheme

    base, tok, _ = load_model(None, dtype=torch.bfloat16)
    calib = load_calibration(CalibConfig(source=str(CALIB), num_samples=64, max_length=512, pack=True), tok)
    text, _ = read_text_source(str(WIKI))
    win = token_windows(text, tok, 512, args.windows)
    q = copy.deepcopy(base)
    quantize_model(q, get_scheme("fp8"), calib.samples, progress=False)

    def measure(m: torch.nn.Module) -> dict:
        r = compare_logits(base, m, win, progress=False)
        return {"kl_mean": r.kl_mean, "ppl_delta_pct": r.ppl_delta_pct}

    rows = {"weights and activations": measure(q)}
    for mod in q.modules():
        if isinstance(mod, QuantLinear):
            mod.quantize_inputs = False
    rows["weights only"] = measure(q)
    for n, mod in q.named_modules():
        if isinstance(mod, QuantLinear):
            mod.quantize_inputs = True
            mod._w_cache = base.get_submodule(n).weight.detach().to(torch.bfloat16)  # the forward's weight
    rows["activations only"] = measure(q)
    out = {"date": str(date.today()), "machine": machine(), "command": "python bench/fp8_error_split.py "
           + " ".join(sys.argv[1:]), "evaluation": f"{WIKI.name}: {args.windows} x 512, bf16 emulation", "rows": rows}
    (REPO / "bench" / "results" / "fp8_error_split.json").write_text(json.dumps(out, indent=2) + "\n")
    for k, v in rows.items():
        print(f"| {k} | {v['kl_mean']:.4f} | {v['ppl_delta_pct']:+.2f}% |")


if __name__ == "__main__":
    main()

"""Mixed precision on smollm2-135m: KL against the fraction of Linear weights kept in BF16 (issue 4).

    .venv/bin/python bench/mixed_precision.py [--windows 40] [--plan-windows 2]

One run:
1. static FP8 (lowbit's default recipe) calibrated on the first 64 windows of 512 tokens of
   groups_merged.txt: the uniform scheme;
2. the KL each layer causes alone, measured on the first `--plan-windows` calibration windows
   (calibration data only: the evaluation text is never used to choose);
3. for each fraction F, the planner's choice (`lowbit.algorithms.mixed.plan`) and, for the same
   memory, a random choice and a choice of whole first/last blocks; the kept layers are swapped back
   to the original BF16 Linear in the calibrated model (`lowbit quantize --keep-fraction`
   re-calibrates instead; the difference is a second-order effect on downstream input scales);
4. KL, top-1 agreement and perplexity on the first 40 windows of 512 tokens of wikitext-2 test.

Writes bench/results/mixed_precision.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LOWBIT_DATA_DIR", REPO.parent / "shared" / "data"))
CALIB = DATA / "calibration" / "groups_merged.txt"
WIKI = DATA / "wikitext-2-raw" / "wiki.test.raw"
FRACTIONS = [0.0, 0.01, 0.02, 0.05, 0.10, 0.20, 0.40]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--plan-windows", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from accuracy import machine  # type: ignore[import-not-found]

    from lowbit.algorithms.mixed import plan
    from lowbit.algorithms.ptq import quantize_model
    from lowbit.analysis.attribution import attribute_kl
    from lowbit.calibration.data import CalibConfig, load_calibration, read_text_source, token_windows
    from lowbit.models import load_model
    from lowbit.nn import QuantLinear
    from lowbit.scheme import get_scheme
    from lowbit.targets import set_submodule

    torch.manual_seed(0)
    base, tok, _ = load_model(None)
    calib = load_calibration(CalibConfig(source=str(CALIB), num_samples=64, max_length=512, pack=True), tok)
    text, _ = read_text_source(str(WIKI))
    ev = token_windows(text, tok, 512, args.windows)
    t0 = time.perf_counter()
    full = copy.deepcopy(base)
    rep = quantize_model(full, get_scheme("fp8"), calib.samples, progress=False)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    attr = attribute_kl(base, full, torch.stack(calib.samples[: args.plan_windows]), progress=True)
    attr_s = time.perf_counter() - t0
    params = {n: full.get_submodule(n).weight.numel() for n in rep.targets}
    total = sum(params.values())

    with torch.inference_mode():
        ref = [torch.log_softmax(base(input_ids=w[None]).logits[0].float(), -1).to(torch.bfloat16) for w in ev]

        def score(keep: list[str]) -> dict[str, float]:
            m = copy.deepcopy(full)
            for n in keep:
                set_submodule(m, n, base.get_submodule(n))
            for mod in m.modules():
                if isinstance(mod, QuantLinear):
                    mod.cache_weight(torch.bfloat16)
            kl, agree, nll, n = 0.0, 0, 0.0, 0
            for i, w in enumerate(ev):
                lp = torch.log_softmax(m(input_ids=w[None]).logits[0].float(), -1)
                r = ref[i].float()
                kl += float((r.exp() * (r - lp)).sum(-1)[:-1].sum())
                agree += int((r.argmax(-1) == lp.argmax(-1))[:-1].sum())
                nll -= float(lp[:-1].gather(-1, w[1:, None]).sum())
                n += w.numel() - 1
            return {"kl": kl / n, "top1": agree / n, "ppl": float(torch.tensor(nll / n).exp())}

        base_nll = 0.0
        for i, w in enumerate(ev):
            base_nll -= float(ref[i][:-1].float().gather(-1, w[1:, None]).sum())
        base_ppl = float(torch.tensor(base_nll / (ev.numel() - ev.shape[0])).exp())

        rows = []
        rng = random.Random(0)
        blocks = sorted({int(n.split(".")[2]) for n in rep.targets})
        for f in FRACTIONS:
            p = plan(attr.per_layer, params, attr.kl_all, keep_fraction=f) if f > 0 else None
            keep = list(p.keep) if p else []
            r = {"strategy": "lowbit plan (per-layer KL)", "fraction_asked": f, "kept_fraction": sum(params[n] for n in keep) / total,
                 "layers_kept": len(keep), "predicted_kl": p.predicted_kl if p else attr.kl_all, **score(keep)}
            rows.append(r)
            print(r, flush=True)
            if f in (0.05, 0.20):
                # same memory, other choices: random layers, and whole blocks from both ends
                names = list(rep.targets)
                rng.shuffle(names)
                for label, order in (("random layers", names),
                                     ("first and last blocks", [n for b in _ends(blocks) for n in rep.targets if f".{b}." in n])):
                    kept, size = [], 0
                    for n in order:
                        if size + params[n] <= f * total:
                            kept.append(n)
                            size += params[n]
                    r = {"strategy": label, "fraction_asked": f, "kept_fraction": size / total, "layers_kept": len(kept),
                         "predicted_kl": None, **score(kept)}
                    rows.append(r)
                    print(r, flush=True)
    out = {
        "date": str(date.today()),
        "machine": machine(),
        "torch": torch.__version__,
        "command": "python bench/mixed_precision.py",
        "calibration": "64 x 512 tokens, groups_merged.txt",
        "evaluation": f"{args.windows} x 512 tokens, wiki.test.raw",
        "plan_data": f"first {args.plan_windows} calibration windows",
        "base_ppl": base_ppl,
        "kl_all_on_plan_windows": attr.kl_all,
        "sum_of_layer_kl_on_plan_windows": attr.sum_of_layers,
        "seconds": {"calibration": calib_s, "attribution": attr_s},
        "per_layer_kl": attr.per_layer,
        "rows": rows,
    }
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "mixed_precision.json").write_text(json.dumps(out, indent=2) + "\n")
    uniform = rows[0]["kl"]
    print(f"\nbase ppl {base_ppl:.3f}; uniform static FP8 KL {uniform:.4f}; bar: KL <= {uniform / 2:.4f} at <= 5% BF16\n")
    print("| strategy | kept (of Linear weights) | layers | KL | KL vs uniform | top-1 | ppl |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['strategy']} | {100 * r['kept_fraction']:.1f}% | {r['layers_kept']} | {r['kl']:.4f} | "
              f"{r['kl'] / uniform:.2f}x | {100 * r['top1']:.2f}% | {r['ppl']:.3f} |")


def _ends(blocks: list[int]) -> list[int]:
    """Blocks alternately from the start and the end: 0, last, 1, last-1, ..."""
    out = []
    lo, hi = 0, len(blocks) - 1
    while lo <= hi:
        out.append(blocks[lo])
        if hi != lo:
            out.append(blocks[hi])
        lo, hi = lo + 1, hi - 1
    return out


if __name__ == "__main__":
    main()

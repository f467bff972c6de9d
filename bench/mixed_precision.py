"""Mixed precision on smollm2-135m: KL against the fraction of Linear weights kept in BF16 (issue 4).

    .venv/bin/python bench/mixed_precision.py [--windows 40] [--plan-windows 2]

One run:
1. every candidate scheme (fp8 static, fp8-dynamic, w8a8-int8) quantizes a copy of the model,
   static scales calibrated on the first 64 windows of 512 tokens of groups_merged.txt;
2. per candidate, the KL each fusion unit (q/k/v together, gate/up together, every other Linear
   alone) causes alone, in float32, on the first `--plan-windows` calibration windows (calibration
   data only: the evaluation text is never used to choose);
3. for each fraction F and each candidate set, the planner's choice (`lowbit.algorithms.mixed.plan`),
   and for the same memory a random choice and whole first/last blocks; the model is assembled from
   the calibrated copies (a unit's modules from its chosen copy, or the original Linear);
4. KL, top-1 agreement and perplexity on the first 40 windows of 512 tokens of wikitext-2 test, in
   bf16 as the model ships.
The 5% row is then checked end to end through `lowbit.quantize` (which re-calibrates the static
scales of the mixed model and writes the checkpoint) and `lowbit.load` of the written checkpoint.

Writes bench/results/mixed_precision.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LOWBIT_DATA_DIR", REPO.parent / "shared" / "data"))
CALIB = DATA / "calibration" / "groups_merged.txt"
WIKI = DATA / "wikitext-2-raw" / "wiki.test.raw"
FRACTIONS = [0.0, 0.01, 0.02, 0.05, 0.10, 0.20]
CANDIDATE_SETS = [("fp8",), ("fp8", "fp8-dynamic"), ("fp8", "w8a8-int8"), ("fp8", "fp8-dynamic", "w8a8-int8")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--plan-windows", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--e2e-only", action="store_true",
                    help="only the end-to-end check of the 5%% plan (lowbit.quantize, reload, evaluate), merged "
                         "into an existing bench/results/mixed_precision.json")
    args = ap.parse_args()
    if args.e2e_only:
        end_to_end(args)
        return
    sys.path.insert(0, str(REPO / "bench"))
    from accuracy import machine  # type: ignore[import-not-found]

    import lowbit
    from lowbit.algorithms.mixed import KEEP, plan, unit_name
    from lowbit.algorithms.ptq import quantize_model
    from lowbit.analysis.attribution import attribute_kl
    from lowbit.calibration.data import CalibConfig, load_calibration, read_text_source, token_windows
    from lowbit.models import load_model
    from lowbit.nn import QuantLinear
    from lowbit.scheme import get_scheme
    from lowbit.targets import fusion_units, set_submodule

    torch.manual_seed(0)
    base, tok, _ = load_model(None)
    calib_cfg = CalibConfig(source=str(CALIB), num_samples=args.num_samples, max_length=512, pack=True)
    calib = load_calibration(calib_cfg, tok)
    text, _ = read_text_source(str(WIKI))
    ev = token_windows(text, tok, 512, args.windows)
    plan_windows = torch.stack(calib.samples[: args.plan_windows])
    schemes = sorted({s for c in CANDIDATE_SETS for s in c}, key=lambda s: (s != "fp8", s))
    copies, kl, kl_all, seconds = {}, {}, {}, {}
    units: list[tuple[str, ...]] = []
    for name in schemes:
        t0 = time.perf_counter()
        m = copy.deepcopy(base)
        rep = quantize_model(m, get_scheme(name), calib.samples, progress=False)
        units = units or fusion_units(rep.targets)
        seconds[f"quantize {name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        a = attribute_kl(base, m, plan_windows, units=units, progress=True, desc=f"KL per unit ({name})")
        seconds[f"attribution {name}"] = time.perf_counter() - t0
        copies[name], kl[name], kl_all[name] = m, a.per_unit, a.kl_all
        for mod in m.modules():
            if isinstance(mod, QuantLinear):
                mod.cache_weight(torch.bfloat16)
    params = {u: sum(base.get_submodule(n).weight.numel() for n in u) for u in units}
    total = sum(params.values())

    with torch.inference_mode():
        ref = [torch.log_softmax(base(input_ids=w[None]).logits[0].float(), -1).to(torch.bfloat16) for w in ev]

        def score_model(m: torch.nn.Module) -> dict[str, float]:
            kl_sum, agree, nll, n = 0.0, 0, 0.0, 0
            for i, w in enumerate(ev):
                lp = torch.log_softmax(m(input_ids=w[None]).logits[0].float(), -1)
                r = ref[i].float()
                kl_sum += float((r.exp() * (r - lp)).sum(-1)[:-1].sum())
                agree += int((r.argmax(-1) == lp.argmax(-1))[:-1].sum())
                nll -= float(lp[:-1].gather(-1, w[1:, None]).sum())
                n += w.numel() - 1
            return {"kl": kl_sum / n, "top1": agree / n, "ppl": float(torch.tensor(nll / n).exp())}

        def score(choice: dict[tuple[str, ...], str]) -> dict[str, float]:
            m = copy.deepcopy(copies["fp8"])
            for u, c in choice.items():
                for n in u:
                    set_submodule(m, n, base.get_submodule(n) if c == KEEP else copies[c].get_submodule(n))
            return score_model(m)

        base_nll = sum(-float(ref[i][:-1].float().gather(-1, w[1:, None]).sum()) for i, w in enumerate(ev))
        base_ppl = float(torch.tensor(base_nll / (ev.numel() - ev.shape[0])).exp())

        rows = []

        def add(strategy: str, cands: tuple[str, ...], f: float, choice: dict, predicted: float | None) -> None:
            kept = sum(params[u] for u, c in choice.items() if c == KEEP)
            per = {s: sum(len(u) for u, c in choice.items() if c == s) for s in cands}
            r = {"strategy": strategy, "candidates": list(cands), "fraction_asked": f, "kept_fraction": kept / total,
                 "layers_kept": sum(len(u) for u, c in choice.items() if c == KEEP), "layers_per_scheme": per,
                 "predicted_kl": predicted, **score(choice)}
            rows.append(r)
            print(json.dumps(r), flush=True)

        for name in schemes:  # uniform schemes
            add(f"uniform {name}", (name,), 0.0, {u: name for u in units}, kl_all[name])
        plans = {}
        for cands in CANDIDATE_SETS:
            for f in FRACTIONS:
                if f == 0 and cands == ("fp8",):
                    continue  # the uniform fp8 row
                p = plan({s: kl[s] for s in cands}, params, kl_all["fp8"], primary="fp8", keep_fraction=f)
                plans[(cands, f)] = p
                add("lowbit plan", cands, f, p.choice, p.predicted_kl)
        rng = random.Random(0)
        blocks = sorted({int(u[0].split(".")[2]) for u in units})
        for f in (0.05, 0.20):  # same memory, other choices of the BF16 layers (fp8 elsewhere)
            shuffled = list(units)
            rng.shuffle(shuffled)
            ends = [u for b in _ends(blocks) for u in units if f".{b}." in u[0]]
            for label, order in (("random layers", shuffled), ("first and last blocks", ends)):
                choice, size = {u: "fp8" for u in units}, 0
                for u in order:
                    if size + params[u] <= f * total:
                        choice[u] = KEEP
                        size += params[u]
                add(label, ("fp8",), f, choice, None)

        # the 5% plan with all candidates, end to end through the product's own path
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            res = lowbit.quantize(None, output=Path(tmp) / "q", scheme="fp8", calib=calib_cfg, keep_fraction=0.05,
                                  candidates=["fp8-dynamic", "w8a8-int8"], plan_windows=args.plan_windows, progress=False)
            loaded = lowbit.load(Path(tmp) / "q")
            e2e = {**score_model(loaded), "kept_fraction": res.provenance["mixed_precision"]["kept_fraction"],
                   "layers_per_scheme": res.provenance["mixed_precision"]["layers_per_scheme"],
                   "predicted_kl": res.provenance["mixed_precision"]["predicted_kl"],
                   "checkpoint_mib": res.provenance["checkpoint_bytes"] / 2**20, "seconds": res.seconds}
        seconds["end to end quantize + eval"] = time.perf_counter() - t0
        print(json.dumps({"end_to_end": e2e}), flush=True)

    out = {
        "date": str(date.today()),
        "machine": machine(),
        "torch": torch.__version__,
        "command": "python bench/mixed_precision.py",
        "calibration": f"{args.num_samples} x 512 tokens, groups_merged.txt",
        "evaluation": f"{args.windows} x 512 tokens, wiki.test.raw, bf16",
        "plan_data": f"first {args.plan_windows} calibration windows, float32 attribution per fusion unit",
        "base_ppl": base_ppl,
        "kl_all_on_plan_windows": kl_all,
        "sum_of_unit_kl_on_plan_windows": {s: sum(v.values()) for s, v in kl.items()},
        "seconds": seconds,
        "per_unit_kl": {s: {unit_name(u): v for u, v in per.items()} for s, per in kl.items()},
        "plan_5pct_all_candidates": plans[(CANDIDATE_SETS[-1], 0.05)].to_dict(),
        "rows": rows,
        "end_to_end_5pct": e2e,
    }
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "mixed_precision.json").write_text(json.dumps(out, indent=2) + "\n")
    uniform = next(r["kl"] for r in rows if r["strategy"] == "uniform fp8")
    print(f"\nbase ppl {base_ppl:.3f}; uniform static FP8 KL {uniform:.4f}; bar: KL <= {uniform / 2:.4f} at <= 5% BF16\n")
    print("| strategy | candidates | kept in BF16 | layers (BF16 / per scheme) | KL | vs uniform fp8 | top-1 | ppl |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        per = ", ".join(f"{s} {n}" for s, n in r["layers_per_scheme"].items())
        print(f"| {r['strategy']} | {'+'.join(r['candidates'])} | {100 * r['kept_fraction']:.1f}% | {r['layers_kept']} / {per} | "
              f"{r['kl']:.4f} | {r['kl'] / uniform:.2f}x | {100 * r['top1']:.2f}% | {r['ppl']:.3f} |")
    print(f"\nend to end (lowbit.quantize --keep-fraction 0.05 --candidates fp8-dynamic,w8a8-int8, reloaded): "
          f"KL {e2e['kl']:.4f} ({e2e['kl'] / uniform:.2f}x), top-1 {100 * e2e['top1']:.2f}%, ppl {e2e['ppl']:.3f}")


def end_to_end(args: argparse.Namespace) -> None:
    """lowbit.quantize --keep-fraction 0.05 --candidates fp8-dynamic,w8a8-int8 on the shared setup, the
    checkpoint reloaded with lowbit.load and scored like the table's rows; merged into the JSON."""
    import lowbit
    from lowbit.calibration.data import CalibConfig, read_text_source, token_windows
    from lowbit.models import load_model

    base, tok, _ = load_model(None)
    text, _ = read_text_source(str(WIKI))
    ev = token_windows(text, tok, 512, args.windows)
    calib_cfg = CalibConfig(source=str(CALIB), num_samples=args.num_samples, max_length=512, pack=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = lowbit.quantize(None, output=Path(tmp) / "q", scheme="fp8", calib=calib_cfg, keep_fraction=0.05,
                              candidates=["fp8-dynamic", "w8a8-int8"], plan_windows=args.plan_windows, progress=True)
        quantize_s = time.perf_counter() - t0
        loaded = lowbit.load(Path(tmp) / "q")
        cfg = json.loads((Path(tmp) / "q" / "config.json").read_text())["quantization_config"]
        mp = res.provenance["mixed_precision"]
        with torch.inference_mode():
            kl_sum, agree, nll, n, base_nll = 0.0, 0, 0.0, 0, 0.0
            for w in ev:
                r = torch.log_softmax(base(input_ids=w[None]).logits[0].float(), -1)
                lp = torch.log_softmax(loaded(input_ids=w[None]).logits[0].float(), -1)
                kl_sum += float((r.exp() * (r - lp)).sum(-1)[:-1].sum())
                agree += int((r.argmax(-1) == lp.argmax(-1))[:-1].sum())
                nll -= float(lp[:-1].gather(-1, w[1:, None]).sum())
                base_nll -= float(r[:-1].gather(-1, w[1:, None]).sum())
                n += w.numel() - 1
        e2e = {"kl": kl_sum / n, "top1": agree / n, "ppl": float(torch.tensor(nll / n).exp()),
               "base_ppl": float(torch.tensor(base_nll / n).exp()),
               "kept_fraction": mp["kept_fraction"], "layers_per_scheme": mp["layers_per_scheme"],
               "predicted_kl": mp["predicted_kl"], "checkpoint_mib": res.provenance["checkpoint_bytes"] / 2**20,
               "config_format": cfg["format"], "config_groups": {k: len(g["targets"]) for k, g in cfg["config_groups"].items()},
               "ignored": len(cfg["ignore"]), "quantize_seconds": quantize_s, "seconds": res.seconds}
    out_path = REPO / "bench" / "results" / "mixed_precision.json"
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    out["end_to_end_5pct"] = e2e
    out["per_unit_kl"] = mp["per_layer_kl"]
    out["kl_all_on_plan_windows"] = mp["kl_all_quantized_per_candidate"]
    out["plan_5pct_all_candidates"] = {k: v for k, v in mp.items() if k != "per_layer_kl"}
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    uniform = next((r["kl"] for r in out.get("rows", []) if r["strategy"] == "uniform fp8"), None)
    rel = f" ({e2e['kl'] / uniform:.2f}x of uniform static FP8 {uniform:.4f})" if uniform else ""
    print(f"end to end: KL {e2e['kl']:.4f}{rel}, top-1 {100 * e2e['top1']:.2f}%, ppl {e2e['ppl']:.3f} "
          f"(base {e2e['base_ppl']:.3f}); kept {100 * e2e['kept_fraction']:.2f}% in BF16; {e2e['layers_per_scheme']}")


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

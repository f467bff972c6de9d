"""Beyond round-to-nearest on smollm2-135m (issue 6): GPTQ, SmoothQuant and AWQ for static FP8,
W8A8-INT8 and W4A16, against llm-compressor's GPTQ on the same calibration windows, in one run.

    .venv/bin/python bench/algorithms.py [--peers] [--only 'LABEL;...'] [--windows 40]

Calibration: the first 64 windows of 512 tokens of ../shared/data/calibration/groups_merged.txt
(what every run, lowbit's and the peer's, sees). Evaluation: the first 40 windows of 512 tokens of
../shared/data/wikitext-2-raw/wiki.test.raw, each checkpoint reloaded from disk and run by lowbit's
emulation (the arithmetic of vLLM's kernels) against the original in bf16. W4A16 uses groups of 64:
576, the model's hidden size, is not a multiple of 128. Writes bench/results/algorithms.json and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from accuracy import CALIB, WIKI, ensure_peers, machine  # type: ignore[import-not-found]  # noqa: E402

# (label, scheme, algorithm, extra quantize() keyword arguments)
LOWBIT_RUNS: list[tuple[str, str, str, dict]] = [
    ("fp8 static, rtn", "fp8", "rtn", {}),
    ("fp8 static, rtn, percentile observer", "fp8", "rtn", {"observer": "percentile"}),
    ("fp8 static, rtn, mse observer", "fp8", "rtn", {"observer": "mse"}),
    ("fp8 static, gptq", "fp8", "gptq", {}),
    ("fp8 static, gptq actorder", "fp8", "gptq", {"gptq_actorder": True}),
    ("fp8 static, smoothquant+gptq", "fp8", "smoothquant+gptq", {}),
    ("w8a8-int8, rtn", "w8a8-int8", "rtn", {}),
    ("w8a8-int8, gptq", "w8a8-int8", "gptq", {}),
    ("w8a8-int8, smoothquant+gptq", "w8a8-int8", "smoothquant+gptq", {}),
    ("w4a16 g64, rtn", "w4a16", "rtn", {"group_size": 64}),
    ("w4a16 g64, gptq", "w4a16", "gptq", {"group_size": 64}),
    ("w4a16 g64, gptq actorder", "w4a16", "gptq", {"group_size": 64, "gptq_actorder": True}),
    ("w4a16 g64, awq", "w4a16", "awq", {"group_size": 64}),
    ("w4a16 g64, awq+gptq", "w4a16", "awq+gptq", {"group_size": 64}),
]
PEER_RUNS = [
    ("llm-compressor GPTQ FP8 (static, per-tensor W)", "gptq:FP8"),
    ("llm-compressor GPTQ W8A8-INT8", "gptq:W8A8"),
    ("llm-compressor SmoothQuant(0.8)+GPTQ W8A8-INT8", "sq+gptq:W8A8"),
    ("llm-compressor GPTQ W4A16 g64", "gptq:W4A16:64"),
    ("llm-compressor AWQ W4A16 g64", "awq:W4A16:64"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", action="store_true", help="also run llm-compressor (installs .peers/ on first use)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--only", default=None, help="';'-separated run labels to keep (exact)")
    args = ap.parse_args()

    import lowbit
    import lowbit.algorithms.awq
    import lowbit.algorithms.sequential
    import lowbit.algorithms.smoothquant
    import lowbit.api
    import lowbit.checkpoint.export
    import lowbit.checkpoint.load  # noqa: F401  (everything loaded now: a later edit of the source cannot mix versions)
    from lowbit.calibration.data import CalibConfig
    from lowbit.eval.run import evaluate
    from lowbit.models import resolve_model

    base_dir = resolve_model("smollm2-135m")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))

    def keep(label: str) -> bool:
        return not args.only or label in {s.strip() for s in args.only.split(";")}

    def run_eval(label: str, ckpt: Path, quantize_s: float, extra: dict) -> None:
        r = evaluate(ckpt, base=str(base_dir), data=str(WIKI), windows=args.windows, seq_len=512, latency=False,
                     progress=False)
        a = r["accuracy"]
        row = {"run": label, "ppl_base": a["ppl_base"], "ppl": a["ppl_quant"], "ppl_delta_pct": a["ppl_delta_pct"],
               "kl_mean": a["kl_mean"], "top1": a["top1_agreement"], "quantize_s": quantize_s,
               "size_mib": r["size"]["quantized_disk_bytes"] / 2**20, **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    calib = CalibConfig(source=str(CALIB), num_samples=args.calib_samples, max_length=512, pack=True)
    for label, scheme, algorithm, kw in LOWBIT_RUNS:
        if not keep("lowbit " + label):
            continue
        t0 = time.perf_counter()
        res = lowbit.quantize(str(base_dir), output=work / f"{len(rows)}", scheme=scheme, calib=calib,
                              algorithm=algorithm, progress=False, **kw)
        wall = time.perf_counter() - t0
        seconds = sum(v for k, v in res.seconds.items() if k not in ("load", "save"))
        ar = res.provenance.get("algorithm_report", {})
        run_eval("lowbit " + label, res.output, seconds,
                 {"wall_s": wall, "gptq_error_vs_rtn_median": ar.get("gptq_error_vs_rtn_median")})
    if args.peers:
        py = ensure_peers()
        for label, spec in PEER_RUNS:
            if not keep(label):
                continue
            out = work / f"llmc-{len(rows)}"
            proc = subprocess.run([str(py), str(REPO / "bench" / "peer_llmcompressor.py"), "--model", str(base_dir),
                                   "--scheme", spec, "--calib", str(CALIB), "--num-samples", str(args.calib_samples),
                                   "--output", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                rows.append({"run": label, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
                continue
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            run_eval(label, out, info["quantize_seconds"], {})

    result = {"date": date.today().isoformat(), "machine": machine(), "lowbit": lowbit.__version__,
              "command": "python bench/algorithms.py " + " ".join(sys.argv[1:]),
              "calibration": f"{CALIB.name}: {args.calib_samples} x 512 tokens",
              "evaluation": f"{WIKI.name}: {args.windows} x 512 tokens, bf16", "rows": rows}
    out = REPO / "bench" / "results" / "algorithms.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and out.exists():  # a partial run updates its rows and keeps the others
        old = json.loads(out.read_text())
        mine = {r["run"] for r in rows}
        result["rows"] = [r for r in old.get("rows", []) if r["run"] not in mine] + rows
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| run | ppl | ppl delta | KL | top-1 | quantize s | size MiB |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['run']} | failed: {r['error']} | | | | | |")
            continue
        print(f"| {r['run']} | {r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f}% | {r['kl_mean']:.4f} | "
              f"{100 * r['top1']:.2f}% | {r['quantize_s']:.0f} | {r['size_mib']:.1f} |")


if __name__ == "__main__":
    main()

"""Accuracy benchmark: lowbit's FP8 schemes on smollm2-135m against the original, and the peer
(llm-compressor) on exactly the same calibration windows and evaluation, in one run.

    .venv/bin/python bench/accuracy.py [--peers] [--windows 40] [--calib-samples 64]

Calibration: the first 64 windows of 512 tokens of ../shared/data/calibration/groups_merged.txt.
Evaluation: the first 40 windows of 512 tokens of ../shared/data/wikitext-2-raw/wiki.test.raw.
Writes bench/results/accuracy.json and prints a Markdown table for BENCHMARKS.md. `--peers`
creates .peers/ (a venv with llm-compressor 0.14, which pins its own transformers) on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LOWBIT_DATA_DIR", REPO.parent / "shared" / "data"))
CALIB = DATA / "calibration" / "groups_merged.txt"
WIKI = DATA / "wikitext-2-raw" / "wiki.test.raw"
PEERS = REPO / ".peers"

LOWBIT_RUNS = [
    # (label, scheme, weight strategy, weight observer)
    ("lowbit fp8 static, per-tensor W, min-max (as llm-compressor FP8)", "fp8", "tensor", "minmax"),
    ("lowbit fp8 static, per-channel W, min-max", "fp8", "channel", "minmax"),
    ("lowbit fp8 static, per-channel W, MSE (default)", "fp8", "channel", "mse"),
    ("lowbit fp8-dynamic, per-channel W, min-max", "fp8-dynamic", "channel", "minmax"),
    ("lowbit fp8-dynamic, per-channel W, MSE (default)", "fp8-dynamic", "channel", "mse"),
]
PEER_RUNS = [("llm-compressor 0.14 FP8 (static, per-tensor W)", "FP8"),
             ("llm-compressor 0.14 FP8_DYNAMIC (per-channel W)", "FP8_DYNAMIC")]


def ensure_peers() -> Path:
    py = PEERS / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "llmcompressor==0.14.0.1"], check=True)
    return py


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", action="store_true", help="also run llm-compressor (installs .peers/ on first use)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--only", default=None, help="comma-separated substrings of run labels to keep")
    ap.add_argument("--noise-offsets", default="",
                    help="e.g. 64,128: repeat the static default and llm-compressor FP8 calibrating on the windows "
                         "that start there, to show how much the numbers move with the calibration sample alone")
    args = ap.parse_args()

    import lowbit
    from lowbit.calibration.data import CalibConfig
    from lowbit.eval.run import evaluate
    from lowbit.models import resolve_model

    base_dir = resolve_model("smollm2-135m")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))

    def run_eval(label: str, ckpt: Path, quantize_s: float, offset: int) -> None:
        r = evaluate(ckpt, base=str(base_dir), data=str(WIKI), windows=args.windows, seq_len=512, latency=False,
                     progress=False)
        a = r["accuracy"]
        row = {"run": label, "ppl_base": a["ppl_base"], "ppl": a["ppl_quant"], "ppl_delta_pct": a["ppl_delta_pct"],
               "kl_mean": a["kl_mean"], "top1": a["top1_agreement"], "quantize_s": quantize_s,
               "size_mib": r["size"]["quantized_disk_bytes"] / 2**20, "tokens": a["tokens"], "calib_offset": offset}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def lowbit_run(label: str, scheme: str, strategy: str, wobs: str, offset: int) -> None:
        calib = CalibConfig(source=str(CALIB), num_samples=args.calib_samples, max_length=512, pack=True,
                            skip_windows=offset)
        res = lowbit.quantize(str(base_dir), output=work / f"{len(rows)}", scheme=scheme, calib=calib,
                              weight_strategy=strategy, weight_observer=wobs, progress=False)
        # From the loaded model to the quantized one (data, weights, calibration): what oneshot times.
        seconds = sum(v for k, v in res.seconds.items() if k not in ("load", "save"))
        run_eval(label, res.output, seconds, offset)

    def peer_run(label: str, preset: str, offset: int) -> None:
        py = ensure_peers()
        out = work / f"llmc-{preset}-{offset}"
        proc = subprocess.run([str(py), str(REPO / "bench" / "peer_llmcompressor.py"), "--model", str(base_dir),
                               "--scheme", preset, "--calib", str(CALIB), "--num-samples", str(args.calib_samples),
                               "--offset", str(offset), "--output", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"llm-compressor run {preset} failed")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        run_eval(label, out, info["quantize_seconds"], offset)

    def keep(label: str) -> bool:
        return not args.only or any(s in label for s in args.only.split(","))

    for label, scheme, strategy, wobs in LOWBIT_RUNS:
        if keep(label):
            lowbit_run(label, scheme, strategy, wobs, 0)
    if args.peers:
        for label, preset in PEER_RUNS:
            if keep(label):
                peer_run(label, preset, 0)
    for offset in [int(o) for o in args.noise_offsets.split(",") if o]:
        lowbit_run("lowbit fp8 static, per-channel W, MSE (default)", "fp8", "channel", "mse", offset)
        if args.peers:
            peer_run(PEER_RUNS[0][0], "FP8", offset)

    result = {"date": date.today().isoformat(), "machine": machine(), "lowbit": lowbit.__version__,
              "command": "python bench/accuracy.py " + " ".join(sys.argv[1:]), "calibration": f"{CALIB.name}: "
              f"{args.calib_samples} x 512 tokens", "evaluation": f"{WIKI.name}: {args.windows} x 512 tokens",
              "dtype": "bfloat16", "rows": rows}
    out = REPO / "bench" / "results" / "accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| run | calib windows | ppl | ppl delta | KL | top-1 | quantize s | size MiB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = r["calib_offset"]
        print(f"| {r['run']} | {o}-{o + args.calib_samples - 1} | {r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f}% | "
              f"{r['kl_mean']:.4f} | {100 * r['top1']:.2f}% | {r['quantize_s']:.1f} | {r['size_mib']:.1f} |")


if __name__ == "__main__":
    main()

"""Peak host memory of streaming quantization (issue 10) against the bar: 1.5 GB + two decoder layers.

    OMP_NUM_THREADS=1 nice python bench/streaming_memory.py [--layers 12] [--samples 8] [--seq-len 128]

Writes a random-weight model of the Llama-3-8B shape with fewer decoder layers straight to disk
(bf16 safetensors shards of at most 2 GiB, one tensor at a time, so the generator itself stays
small; normal(0, 0.02) weights, unit norms), then quantizes it with `lowbit.runtime.quantize_streaming`
(static FP8, round to nearest, random calibration tokens) in a fresh subprocess on the CPU and reads
the subprocess's peak resident set: its VmHWM (/proc/self/status), which the run records in its
provenance. Not getrusage(RUSAGE_CHILDREN).ru_maxrss: Linux folds into a child's ru_maxrss the
peak of the image it replaced at exec, which for Python's vfork-based subprocess is this parent's
peak (the model writer's). The model is written in a subprocess too. Writes
bench/results/streaming_memory.json and prints a table. The model and output live under a
directory in /tmp, deleted at the end unless --keep; the disk is checked first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GB, GiB = 10**9, 2**30

CHILD = """
import json, sys, torch
from pathlib import Path
from lowbit.runtime import quantize_streaming
g = torch.Generator().manual_seed(0)
samples = [torch.randint(0, 128000, ({seq_len},), generator=g) for _ in range({samples})]
prov = quantize_streaming(Path({model!r}), Path({out!r}), {scheme!r}, samples, algorithm={algorithm!r},
                          activations_on_disk={on_disk}, progress=False)
print("RESULT " + json.dumps({{"streaming": prov["streaming"], "seconds": prov["seconds"]}}))
"""


def write_random_model(directory: Path, layers: int, shard_bytes: int = 2 * GiB) -> int:
    """config.json + sharded safetensors of the llama-3-8b shape with `layers` decoder layers."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from lowbit.models.shapes import shape_config

    config = shape_config("llama-3-8b", num_hidden_layers=layers)
    config.dtype = torch.bfloat16
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: list[list[str]] = [[]]
    files: list[str] = []
    total = 0

    def flush() -> None:
        nonlocal size
        if shards[-1]:
            name = f"shard-{len(files):05d}.safetensors"
            save_file(shards[-1], str(directory / name), metadata={"format": "pt"})
            files.append(name)
            names.append([])
            shards[-1] = {}
            size = 0

    for key, p in model.state_dict().items():
        nbytes = p.numel() * 2
        if size and size + nbytes > shard_bytes:
            flush()
        if key.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        shards[-1][key] = t
        names[len(files)].append(key)
        size += nbytes
        total += nbytes
    flush()
    n = len(files)
    weight_map = {}
    for i, f in enumerate(files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(directory / f, directory / final)
        weight_map.update({k: final for k in names[i]})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def layer_bytes(directory: Path) -> int:
    from lowbit.runtime.source import SourceModel

    src = SourceModel(directory)
    per: dict[int, int] = {}
    for name, info in src.tensors.items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            per[i] = per.get(i, 0) + info.nbytes
    return max(per.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--scheme", default="fp8")
    ap.add_argument("--algorithm", default="rtn")
    ap.add_argument("--activations-on-disk", action="store_true")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/lowbit-streaming-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the model and the checkpoint")
    args = ap.parse_args()
    model_dir, out = args.dir / f"llama-3-8b-{args.layers}l", args.dir / "out"
    need = args.layers * 0.45 * GB * 1.6 + 2.2 * GB * 1.5
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if not (model_dir / "model.safetensors.index.json").exists() and free < need:
        raise SystemExit(f"{args.dir}: {free / GB:.1f} GB free, about {need / GB:.1f} GB needed")
    t0 = time.perf_counter()
    if not (model_dir / "model.safetensors.index.json").exists():  # in a subprocess: this one stays small
        writer = f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); from streaming_memory import " \
                 f"write_random_model; from pathlib import Path; write_random_model(Path({str(model_dir)!r}), {args.layers})"
        subprocess.run([sys.executable, "-c", writer], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    build_s = time.perf_counter() - t0
    model_disk = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    one_layer = layer_bytes(model_dir)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(Path(str(out) + ".lowbit-partial"), ignore_errors=True)
    code = CHILD.format(seq_len=args.seq_len, samples=args.samples, model=str(model_dir), out=str(out),
                        scheme=args.scheme, algorithm=args.algorithm, on_disk=args.activations_on_disk)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-c", code]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    run_s = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"the streaming run failed ({p.returncode}):\n{p.stderr[-4000:]}")
    result = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    peak = result["streaming"]["peak_host_bytes_rank0"]  # the run's own VmHWM
    ckpt = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    bar = int(1.5 * GB) + 2 * one_layer
    plan = result["streaming"]["plan"]
    row = {
        "model": f"llama-3-8b shape, {args.layers} decoder layers, random bf16 weights",
        "model_bytes_on_disk": model_disk, "largest_layer_bytes": one_layer, "checkpoint_bytes": ckpt,
        "peak_rss_bytes": peak, "bar_bytes": bar, "below_bar": peak < bar,
        "plan_host_peak_bytes": plan["host_peak_bytes"], "plan_process_bytes": plan["process_bytes"],
        "plan_over_measured": plan["host_peak_bytes"] / peak,
        "seconds": round(run_s, 1), "seconds_per_unit": result["seconds"], "build_seconds": round(build_s, 1),
    }
    record = {
        "date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "threads": os.environ.get("OMP_NUM_THREADS"),
        "command": "OMP_NUM_THREADS=1 nice python bench/streaming_memory.py " + " ".join(sys.argv[1:]),
        "run": f"quantize_streaming(scheme={args.scheme!r}, algorithm={args.algorithm!r}, "
               f"{args.samples} x {args.seq_len} random tokens, activations "
               f"{'on disk' if args.activations_on_disk else 'in memory'}, CPU, one process)",
        "bar": "peak RSS < 1.5 GB + 2 x the largest decoder layer (issue 10)",
        **row,
    }
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "streaming_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    g = lambda b: f"{b / GiB:.2f} GiB ({b / GB:.2f} GB)"  # noqa: E731
    print(f"\n{record['run']}\n")
    print("| quantity | value |\n|---|---:|")
    for k, v in [("model on disk", g(model_disk)), ("largest decoder layer", g(one_layer)),
                 ("checkpoint written", g(ckpt)), ("peak RSS (measured)", g(peak)),
                 ("bar: 1.5 GB + 2 layers", g(bar)), ("below the bar", str(peak < bar)),
                 ("plan's host estimate", g(plan["host_peak_bytes"])), ("time", f"{run_s:.0f} s")]:
        print(f"| {k} | {v} |")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

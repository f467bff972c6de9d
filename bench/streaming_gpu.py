"""Streaming quantization on one CUDA GPU (issue 10): the same checkpoint as the in-memory paths, and
peak GPU memory against the plan's estimate.

    PYTHONPATH=src python bench/streaming_gpu.py [--layers 2] [--samples 16] [--seq-len 512]

1. A tiny random Llama: streaming RTN (static FP8) and GPTQ (static FP8, W4A16) on the GPU, one
   process and one NCCL rank (world of 1, so every collective runs through NCCL), against
   `quantize_model` / `quantize_sequential` on the GPU + `save_checkpoint`: tensors compared bit for bit.
2. A random-weight model of the Llama-3-8B shape with --layers decoder layers, written to disk
   (bench/streaming_memory.py's writer): streaming GPTQ (W4A16) and RTN (static FP8) on the GPU; peak
   GPU memory (torch.cuda.max_memory_allocated) and peak host memory against the plan.

Writes bench/results/streaming_gpu.json (or --json) and prints a table. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def equal_dirs(a: Path, b: Path) -> list[str]:
    from lowbit.checkpoint.io import load_tensors

    ta, tb = load_tensors(a), load_tensors(b)
    if ta.keys() != tb.keys():
        return sorted(set(ta) ^ set(tb))
    return [k for k in ta if not torch.equal(ta[k], tb[k])]


def tiny_checks(root: Path) -> list[dict]:
    from lowbit.algorithms.ptq import quantize_model
    from lowbit.algorithms.sequential import SequentialOptions, quantize_sequential
    from lowbit.checkpoint.export import save_checkpoint
    from lowbit.models import load_model
    from lowbit.runtime.distributed import free_port, init_process_group
    from lowbit.runtime.streaming import StreamJob, quantize_streaming, run
    from lowbit.scheme import get_scheme
    from tests.conftest import tiny_llama, word_tokenizer

    src = root / "tiny"
    tiny_llama(seed=3, num_hidden_layers=3, tie_word_embeddings=False).save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    samples = [torch.randint(3, 300, (24 + 4 * i,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    rows = []
    col = init_process_group(0, 1, torch.device("cuda:0"), f"tcp://127.0.0.1:{free_port()}")
    for scheme, algo in [("fp8", "rtn"), ("fp8", "gptq"), ("w4a16", "gptq")]:
        s = get_scheme(scheme, group_size=32) if scheme == "w4a16" else get_scheme(scheme)
        net, tok, _ = load_model(src, device="cuda")
        if algo == "rtn":
            rep = quantize_model(net, s, samples, progress=False)
        else:
            rep = quantize_sequential(net, s, samples, SequentialOptions(algo, device="cuda"), progress=False)
        ref = root / f"ref-{scheme}-{algo}"
        save_checkpoint(net, tok, ref, scheme=s, ignore=rep.ignored, provenance={})
        one = root / f"one-{scheme}-{algo}"
        quantize_streaming(src, one, s, samples, algorithm=algo, device="cuda", progress=False)
        nccl = root / f"nccl-{scheme}-{algo}"
        job = StreamJob(src, nccl, s, samples, SequentialOptions(algo), progress=False)
        run(col, torch.device("cuda:0"), job)
        rows.append({"scheme": scheme, "algorithm": algo, "streaming_vs_in_memory_differing": equal_dirs(one, ref),
                     "nccl_rank_vs_one_process_differing": equal_dirs(nccl, one)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


CONFIGS = {"w4a16-gptq": ("w4a16", "gptq", False), "fp8-rtn": ("fp8", "rtn", False),
           "w4a16-gptq-disk": ("w4a16", "gptq", True)}


def big_runs(root: Path, layers: int, n: int, seq_len: int, configs: list[str], cap_gib: float | None) -> list[dict]:
    from bench.streaming_memory import layer_bytes, write_random_model

    model = root / f"llama-3-8b-{layers}l"
    t0 = time.perf_counter()
    total = write_random_model(model, layers)
    print(f"wrote {total / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for scheme, algo, on_disk in [CONFIGS[c] for c in configs]:
        out = root / f"out-{scheme}-{algo}-{on_disk}"
        code = CHILD.format(repo=str(REPO), model=str(model), out=str(out), scheme=scheme, algo=algo,
                            on_disk=on_disk, n=n, seq_len=seq_len, cap=cap_gib)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        prov = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
        st = prov["streaming"]
        row = {"scheme": scheme, "algorithm": algo, "activations_on_disk": on_disk, "layers": layers,
               "gpu_cap_gib": cap_gib,
               "model_gib": total / 2**30, "layer_gib": layer_bytes(model) / 2**30,
               "samples": f"{n} x {seq_len}", "seconds": round(time.perf_counter() - t0, 1),
               "peak_gpu_gib": st["peak_gpu_bytes"] / 2**30, "plan_gpu_gib": st["plan"]["gpu_peak_bytes"] / 2**30,
               "peak_host_gib": st["peak_host_bytes_rank0"] / 2**30,
               "plan_host_gib": st["plan"]["host_peak_bytes"] / 2**30,
               "seconds_per_unit": prov["seconds"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


CHILD = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from lowbit.runtime import quantize_streaming
from lowbit.scheme import get_scheme
if {cap!r} is not None:  # the bar's cap: this process may allocate at most cap GiB of the GPU
    torch.cuda.set_per_process_memory_fraction({cap!r} * 2**30 / torch.cuda.get_device_properties(0).total_memory)
g = torch.Generator().manual_seed(0)
samples = [torch.randint(0, 128000, ({seq_len},), generator=g) for _ in range({n})]
prov = quantize_streaming({model!r}, {out!r}, get_scheme({scheme!r}), samples, algorithm={algo!r}, device="cuda",
                          activations_on_disk={on_disk}, progress=False)
print("RESULT " + json.dumps({{"streaming": prov["streaming"], "seconds": prov["seconds"]}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--cap-gib", type=float, default=None,
                    help="cap the quantizing process's GPU memory (torch.cuda.set_per_process_memory_fraction)")
    ap.add_argument("--skip-tiny", action="store_true", help="only the large model")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "streaming_gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    with tempfile.TemporaryDirectory(prefix="lowbit-stream-gpu-") as d:
        tiny = [] if args.skip_tiny else tiny_checks(Path(d))
        big = big_runs(Path(d), args.layers, args.samples, args.seq_len, args.configs.split(","), args.cap_gib)
    out = {"date": str(date.today()), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "python bench/streaming_gpu.py " + " ".join(sys.argv[1:]), "tiny": tiny, "runs": big}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print("\n| scheme | algorithm | activations | GPU cap (GiB) | peak GPU (GiB) | plan GPU (GiB) | peak host (GiB) | plan host (GiB) | s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in big:
        print(f"| {r['scheme']} | {r['algorithm']} | {'disk' if r['activations_on_disk'] else 'memory'} | "
              f"{r['gpu_cap_gib'] or '-'} | "
              f"{r['peak_gpu_gib']:.2f} | {r['plan_gpu_gib']:.2f} | {r['peak_host_gib']:.2f} | {r['plan_host_gib']:.2f} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()

"""Peak GPU memory of layer-by-layer GPTQ against the model's size (issue 6): it should follow one
decoder layer plus the calibration activations, not the number of layers.

    PYTHONPATH=src python bench/sequential_memory.py [--layers 4,16,32] [--hidden 2048]

Random-weight Llama models built from a config (no download), bf16, kept on the CPU; every decoder
layer is moved to the GPU, calibrated and quantized (w4a16 GPTQ, groups of 128) and moved back.
Writes bench/results/sequential_memory.json and prints a Markdown table. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="4,16,32")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--scheme", default="w4a16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.algorithms.sequential import SequentialOptions, quantize_sequential
    from lowbit.scheme import get_scheme

    rows = []
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 32000, (args.seq_len,), generator=gen) for _ in range(args.samples)]
    for n in [int(x) for x in args.layers.split(",")]:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_hidden_layers=n, num_attention_heads=args.hidden // 128, num_key_value_heads=4,
                          max_position_embeddings=4096)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        rep = quantize_sequential(model, get_scheme(args.scheme), samples, SequentialOptions("gptq", device="cuda"),
                                  progress=False)
        seconds = time.perf_counter() - t0
        row = {"layers": n, "model_gib": model_bytes / 2**30, "layer_gib": layer_bytes / 2**30,
               "peak_gpu_gib": (rep.peak_bytes or 0) / 2**30, "seconds": seconds,
               "activations_gib": args.samples * args.seq_len * args.hidden * 2 / 2**30}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    out = {"date": str(date.today()), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "python bench/sequential_memory.py", "scheme": args.scheme, "algorithm": "gptq",
           "samples": f"{args.samples} x {args.seq_len} random tokens", "rows": rows}
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "sequential_memory.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{out['gpu']}, {args.scheme} GPTQ, {out['samples']}\n")
    print("| decoder layers | model (GiB) | one layer (GiB) | calibration activations (GiB) | peak GPU (GiB) | time (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['model_gib']:.2f} | {r['layer_gib']:.3f} | {r['activations_gib']:.3f} | "
              f"{r['peak_gpu_gib']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()

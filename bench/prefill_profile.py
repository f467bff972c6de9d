"""Where prefill time goes: GPU kernel time of one Llama-3-8B-shaped prefill, by kind of kernel (issue 5).

    PYTHONPATH=src python bench/prefill_profile.py [--batch 8 --length 2048] [--layers 32]

For bf16 and lowbit's static FP8 (per-channel and per-tensor weights, as `lowbit bench` builds
them), one prefill forward under torch.profiler; CUDA kernel time summed into GEMM, FP8 activation
quantization, attention and everything else (norms, RoPE, SiLU * up, residual adds, casts). The
"everything else" part does not change with the matmul's format, and bounds the speedup any FP8
GEMM can give an eager transformers model: bf16 total / (rest + GEMM / GEMM speedup).
Writes bench/results/prefill_profile.json.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


def kind(name: str) -> str:
    n = name.lower()
    if "_quant_" in n:
        return "fp8 activation quantization"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "efficient")):  # before GEMM: cuDNN's say sm90
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "gemv", "scaled_mm", "cublas")):
        return "GEMM"
    return "other (norms, RoPE, SiLU, adds, casts)"


@torch.inference_mode()
def profile(model: Any, ids: torch.Tensor) -> dict[str, float]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for _ in range(3):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if us and ev.device_type == torch.autograd.DeviceType.CUDA:
            out[kind(ev.key)] = out.get(kind(ev.key), 0.0) + us / 1e3
            kernels.append((us / 1e3, kind(ev.key), ev.key[:120]))
    out["top_kernels"] = sorted(kernels, reverse=True)[:12]  # type: ignore[assignment]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    from lowbit.eval.bench import make_variant
    from lowbit.models.shapes import build_random

    base = build_random("llama-3-8b", device="cuda", num_hidden_layers=args.layers)
    vocab = int(base.config.vocab_size)
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0)).cuda()
    calib = [torch.randint(0, vocab, (256,), generator=torch.Generator().manual_seed(2)) for _ in range(2)]
    rows = {}
    for v in ("bf16", "lowbit-fp8", "lowbit-fp8-tensor"):
        m = make_variant(base, v, calib=calib)
        rows[v] = profile(m, ids)
        rows[v]["total"] = sum(x for k, x in rows[v].items() if k != "top_kernels")
        print(v, {k: round(x, 1) for k, x in rows[v].items() if k != "top_kernels"}, flush=True)
        if m is not base:
            del m
        torch.cuda.empty_cache()
    bf = rows["bf16"]
    rest = bf["total"] - bf.get("GEMM", 0.0)
    bounds = {f"{s}x GEMM": bf["total"] / (rest + bf.get("GEMM", 0.0) / s) for s in (1.6, 1.8, 2.0)}
    out = {"date": str(date.today()), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "python bench/prefill_profile.py", "shape": f"llama-3-8b, {args.layers} layers",
           "prefill": f"{args.batch}x{args.length}", "kernel_ms": rows,
           "eager_speedup_bound_if_gemm_speedup_is": bounds}
    print(json.dumps(bounds), flush=True)
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "prefill_profile.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

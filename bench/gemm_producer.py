"""The FP8 Linear with its activation quantization fused into the op that produces its input.

    PYTHONPATH=src python bench/gemm_producer.py [--autotune]

Issue 5's GEMM bar asks for an FP8 per-tensor Linear >= 1.75x bf16 at 4096^3. A Linear that
quantizes its own input pays one extra memory-bound pass (read bf16, write E4M3) that the bf16
Linear does not (bench/gemm_autotune.py: 1.55x at 4096^3 against 1.86x for the bare GEMM). In a
decoder layer the input of every Linear comes from an elementwise op (RMSNorm before q/k/v and
gate/up, SiLU(gate) * up before down), and under torch.compile lowbit's QuantLinear traces its
quantization as torch ops, so inductor fuses it into that op: the producer then writes one byte
per element instead of two and the Linear is only the FP8 GEMM. This script times that unit,
producer + Linear, as `lowbit bench --compile` runs it, against the same unit in bf16:

* bf16: producer + `F.linear`, torch.compile (default mode) and eager;
* lowbit FP8 static per-tensor: producer + `QuantLinear` (E4M3 weights, stored input scale),
  torch.compile (default mode: the quantization fused into the producer) and eager (the producer in
  bf16, then lowbit's Triton quantization kernel, then `_scaled_mm`);
* the producers alone (bf16 output; E4M3 output), so the Linear's own share can be read off;
* with --autotune, also both units under max-autotune at 4096^3 (slow to compile).

GPU time from CUDA-graph replays (lowbit.eval.bench._graph_ms), one process, every ratio against
bf16 in the same mode. The compiled FP8 unit is checked against the eager one (max relative
difference of the output). Writes bench/results/gemm_producer.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
# (producer, M, K, N): 4096^3 is the bar's size; 8 x 2048 tokens of Llama-3-8B give M = 16384 with
# q (K = N = 4096), gate or up (4096 -> 14336) and down (14336 -> 4096)
UNITS = (("rmsnorm", 4096, 4096, 4096), ("silu_mul", 4096, 4096, 4096), ("rmsnorm", 8192, 8192, 8192),
         ("rmsnorm", 16384, 4096, 4096), ("rmsnorm", 16384, 4096, 14336), ("silu_mul", 16384, 14336, 4096))


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """transformers' LlamaRMSNorm: float32 statistics, the weight applied in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _time(fn: Callable[[], torch.Tensor], compiled: bool, mode: str | None = None) -> tuple[float, torch.Tensor]:
    from lowbit.eval.bench import _graph_ms

    torch._dynamo.reset()
    f = torch.compile(fn, mode=mode) if compiled else fn
    out = f()
    return _graph_ms(f), out


@torch.no_grad()
def measure(producer: str, m: int, k: int, n: int, autotune: bool) -> dict:
    from lowbit.nn import QuantLinear
    from lowbit.scheme import get_scheme

    g = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    if producer == "rmsnorm":
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        w = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).to(torch.bfloat16)
        args: tuple[torch.Tensor, ...] = (x,)

        def make() -> torch.Tensor:
            return rmsnorm(x, w)
    else:
        gate = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        up = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        args = (gate, up)

        def make() -> torch.Tensor:
            return silu_mul(gate, up)
    s = get_scheme("fp8", weight_strategy="tensor", weight_observer="minmax")
    q = QuantLinear.from_linear(lin, s.weights, s.input_activations, torch.bfloat16)
    q.set_input_scale(make().abs().amax().float())
    sx = q.input_scale.float().reshape(())

    def producer_fp8() -> torch.Tensor:
        return (make().float() / sx).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)

    units = {"bf16": lambda: F.linear(make(), lin.weight), "fp8": lambda: q(make())}
    row: dict = {"producer": producer, "M": m, "K": k, "N": n, "inputs": len(args)}
    outs = {}
    for mode_label, compiled, mode in (("eager", False, None), ("compiled", True, None)) + (
            (("autotuned", True, "max-autotune-no-cudagraphs"),) if autotune else ()):
        for name, fn in units.items():
            row[f"{name}_{mode_label}_ms"], outs[(name, mode_label)] = _time(fn, compiled, mode)
        row[f"speedup_{mode_label}"] = row[f"bf16_{mode_label}_ms"] / row[f"fp8_{mode_label}_ms"]
        print(json.dumps({k2: v for k2, v in row.items() if mode_label in k2}), flush=True)
    row["producer_bf16_compiled_ms"], _ = _time(make, True)
    row["producer_fp8_compiled_ms"], _ = _time(producer_fp8, True)
    # the Linear's own time with its input produced (and quantized) upstream
    row["linear_bf16_ms"] = row["bf16_compiled_ms"] - row["producer_bf16_compiled_ms"]
    row["linear_fp8_ms"] = row["fp8_compiled_ms"] - row["producer_fp8_compiled_ms"]
    row["linear_speedup"] = row["linear_bf16_ms"] / row["linear_fp8_ms"]
    ref = outs[("fp8", "eager")].float()
    row["fp8_compiled_vs_eager_max_rel"] = float((outs[("fp8", "compiled")].float() - ref).abs().max() / ref.abs().max())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--autotune", action="store_true", help="also max-autotune both units at 4096^3")
    ap.add_argument("--json", default="gemm_producer.json")
    args = ap.parse_args()
    rows = []
    for producer, m, k, n in UNITS:
        row = measure(producer, m, k, n, args.autotune and (m, k, n) == (4096, 4096, 4096))
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {"date": date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "python bench/gemm_producer.py" + (" --autotune" if args.autotune else ""), "rows": rows}
    path = REPO / "bench" / "results" / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{out['gpu']}, torch {out['torch']}; ms per unit (producer + Linear), speedup = bf16 / FP8 in the same mode")
    print("| producer | M x K x N | bf16 compiled ms | FP8 compiled ms | unit, compiled | unit, eager | unit, autotuned |"
          " Linear alone (unit - producer) | compiled vs eager |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        auto = f"{r['speedup_autotuned']:.2f}x" if "speedup_autotuned" in r else "-"
        print(f"| {r['producer']} | {r['M']}x{r['K']}x{r['N']} | {r['bf16_compiled_ms']:.3f} | {r['fp8_compiled_ms']:.3f} "
              f"| {r['speedup_compiled']:.2f}x | {r['speedup_eager']:.2f}x | {auto} | {r['linear_speedup']:.2f}x "
              f"| {r['fp8_compiled_vs_eager_max_rel']:.1e} |")


if __name__ == "__main__":
    main()

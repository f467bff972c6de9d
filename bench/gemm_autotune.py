"""Can a tuned FP8 GEMM beat cuBLAS's at 4096^3 (issue 5's GEMM bar, >= 1.75x bf16)?

    PYTHONPATH=src python bench/gemm_autotune.py

For each (M, K, N): bf16 `F.linear` (eager cuBLAS, and compiled with max-autotune), lowbit's FP8
Linear (static per-tensor input scale, quantization included; eager), the bare `torch._scaled_mm`,
and the same static FP8 Linear compiled by inductor with max-autotune (Triton GEMM templates,
persistent TMA kernels and prologue fusion of the quantization allowed, cuBLAS among the choices).
GPU time from CUDA graph replays (lowbit.eval.bench._graph_ms). Writes bench/results/gemm_autotune.json.
"""

from __future__ import annotations

import functools
import json
import sys
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
SIZES = ((4096, 4096, 4096), (8192, 8192, 8192), (16384, 4096, 14336))


def main() -> None:
    import torch._inductor.config as ic

    from lowbit.eval.bench import _graph_ms
    from lowbit.nn import QuantLinear
    from lowbit.scheme import get_scheme

    ic.max_autotune_gemm_backends = "ATEN,TRITON"
    for flag in ("prologue_fusion",):
        if hasattr(ic, flag):
            setattr(ic, flag, True)
    if hasattr(ic.triton, "enable_persistent_tma_matmul"):
        ic.triton.enable_persistent_tma_matmul = True
    rows = []
    for m, k, n in [tuple(int(v) for v in a.split("x")) for a in sys.argv[1:]] or SIZES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        row: dict = {"M": m, "K": k, "N": n}
        row["bf16_ms"] = _graph_ms(functools.partial(lin, x))
        s = get_scheme("fp8", weight_strategy="tensor", weight_observer="minmax")
        q = QuantLinear.from_linear(lin, s.weights, s.input_activations, torch.bfloat16)
        q.set_input_scale(x.abs().amax().float())
        row["lowbit_fp8_eager_ms"] = _graph_ms(functools.partial(q, x))
        wq = q.weight.data  # (N, K) E4M3 codes
        sw, sx = q.weight_scale.float().reshape(()), q.input_scale.float().reshape(())
        one = torch.ones((), device="cuda")
        xq = x.to(torch.float8_e4m3fn)
        row["scaled_mm_only_ms"] = _graph_ms(functools.partial(torch._scaled_mm, xq, wq.t(), scale_a=one, scale_b=one,
                                                               out_dtype=torch.bfloat16, use_fast_accum=True))

        def fp8_static(a: torch.Tensor, wq: torch.Tensor = wq, sx: torch.Tensor = sx,
                       sw: torch.Tensor = sw) -> torch.Tensor:
            a8 = (a.float() / sx).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            return torch._scaled_mm(a8, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)

        def bf16(a: torch.Tensor, w: torch.Tensor = lin.weight) -> torch.Tensor:
            return F.linear(a, w)

        for label, fn in (("bf16_autotuned", bf16), ("fp8_static_autotuned", fp8_static)):
            torch._dynamo.reset()
            try:
                c = torch.compile(fn, mode="max-autotune-no-cudagraphs", fullgraph=True)
                c(x)
                row[f"{label}_ms"] = _graph_ms(functools.partial(c, x))
            except Exception as e:  # noqa: BLE001 - a failed autotune is a row, not the end of the run
                row[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ref = fp8_static(x).float()
        got = torch.compile(fp8_static, mode="max-autotune-no-cudagraphs", fullgraph=True)(x).float()
        row["autotuned_vs_eager_max_rel"] = float((got - ref).abs().max() / ref.abs().max())
        for key in [kk for kk in row if kk.endswith("_ms") and kk != "bf16_ms"]:
            row[key.replace("_ms", "_speedup")] = row["bf16_ms"] / row[key]
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {"date": date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "python bench/gemm_autotune.py " + " ".join(sys.argv[1:]), "rows": rows}
    path = REPO / "bench" / "results" / "gemm_autotune.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("| M x K x N | bf16 ms | fp8 eager | scaled_mm only | bf16 autotuned | fp8 autotuned |")
    for r in rows:
        cells = [f"{r.get(k + '_speedup', float('nan')):.2f}x" for k in
                 ("lowbit_fp8_eager", "scaled_mm_only", "bf16_autotuned", "fp8_static_autotuned")]
        print(f"| {r['M']}x{r['K']}x{r['N']} | {r['bf16_ms']:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Speed of format simulation: quantize-dequantize of a 4096 x 4096 float32 tensor, against a plain
cast to torch.float8_e4m3fn and back, side by side in one process (and compressed-tensors' fake
quantization, the peer, on the same tensor where it has the format).

    .venv/bin/python bench/formats_speed.py [--device cpu|cuda] [--repeats 7]

The bar (issue 3): lowbit's simulated quantize-dequantize costs at most 2x the cast round trip.
Every lowbit row is also checked against its reference result before it is timed. Writes
bench/results/formats_speed_<device>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from lowbit.formats.block import MXFP4, NVFP4, block_fake_quantize
from lowbit.formats.float8 import E4M3, fake_quantize
from lowbit.formats.integer import INT8
from lowbit.formats.integer import fake_quantize as int_fake_quantize
from lowbit.formats.minifloat import E2M1, E3M4, E4M3FN, E5M2
from lowbit.formats.nf4 import fake_quantize_nf4

REPO = Path(__file__).resolve().parent.parent


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} CPUs"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_rows(rows: list[tuple[str, Callable[[], torch.Tensor]]], device: str, repeats: int) -> list[float]:
    """Median seconds per call of each row. Rows are timed in turn, round after round, so a slow
    moment of the machine hits every row alike; two warm-up calls each first (the first may compile)."""
    for _, fn in rows:
        fn()
        fn()
    sync(device)
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(repeats):
        for i, (_, fn) in enumerate(rows):
            t = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def ct_rows(x: torch.Tensor, scale: torch.Tensor) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fq
    except ImportError:
        return []
    fp8 = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True)
    i8 = QuantizationArgs(num_bits=8, type="int", strategy="tensor", symmetric=True)
    zero = torch.zeros(1, device=x.device)
    s8 = (x.abs().amax() / 127).reshape(1)
    return [
        ("compressed-tensors fake_quantize, E4M3 per tensor", lambda: ct_fq(x, scale.reshape(1), zero, fp8)),
        ("compressed-tensors fake_quantize, INT8 per tensor", lambda: ct_fq(x, s8, zero, i8)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args()
    dev = args.device
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.size, args.size, device=dev, generator=g)
    amax = x.abs().amax()
    s_e4m3 = float(amax) / E4M3FN.max
    s_tensor = (amax / E4M3FN.max).reshape(1, 1)
    s_rows = x.abs().amax(dim=1, keepdim=True) / E4M3FN.max

    def simulator(fmt):  # type: ignore[no-untyped-def]
        s = float(amax) / fmt.max
        return lambda: fmt.quantize_dequantize(x, s)

    rows: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("torch cast to float8_e4m3fn and back (baseline)", lambda: x.to(torch.float8_e4m3fn).float()),
        ("lowbit fp8 scheme fake_quantize, E4M3 per tensor", lambda: fake_quantize(x, s_tensor, E4M3)),
        ("lowbit fp8 scheme fake_quantize, E4M3 per channel", lambda: fake_quantize(x, s_rows, E4M3)),
        ("lowbit simulator E4M3FN, per-tensor scale", simulator(E4M3FN)),
        ("lowbit simulator E5M2, per-tensor scale", simulator(E5M2)),
        ("lowbit simulator E3M4, per-tensor scale", simulator(E3M4)),
        ("lowbit simulator E2M1 (FP4), per-tensor scale", simulator(E2M1)),
        ("lowbit INT8 per tensor", lambda: int_fake_quantize(x, (amax / 127).reshape(1, 1), torch.zeros((), dtype=torch.int32, device=dev), INT8)),
        ("lowbit MXFP4 (block 32, E8M0)", lambda: block_fake_quantize(x, MXFP4)),
        ("lowbit NVFP4 (block 16, E4M3 + FP32)", lambda: block_fake_quantize(x, NVFP4)),
        ("lowbit NF4 (block 64)", lambda: fake_quantize_nf4(x, 64)),
        *ct_rows(x, torch.tensor(s_e4m3, device=dev)),
    ]
    # correctness before speed: the simulator (on this device) must equal torch's own E4M3 rounding
    # computed on the CPU, where x / s is a correctly rounded division (CUDA's x / scalar is not)
    xc = x.cpu()
    ref = (xc / s_e4m3).to(torch.float8_e4m3fn).float() * s_e4m3
    assert torch.equal(E4M3FN.quantize_dequantize(x, s_e4m3).cpu(), ref), "simulator disagrees with torch's E4M3 cast"
    secs = time_rows(rows, dev, args.repeats)
    results = []
    for (label, _), t in zip(rows, secs, strict=True):
        results.append({"label": label, "ms": t * 1e3, "ratio_to_cast": t / secs[0]})
        print(f"{label:62s} {t * 1e3:9.2f} ms  {t / secs[0]:6.2f}x", flush=True)
    out = {
        "date": str(date.today()),
        "machine": machine(dev),
        "device": dev,
        "torch": torch.__version__,
        "shape": [args.size, args.size],
        "repeats": args.repeats,
        "command": f"python bench/formats_speed.py --device {dev}",
        "rows": results,
    }
    dest = REPO / "bench" / "results" / f"formats_speed_{dev.split(':')[0]}.json"
    if os.environ.get("OUT"):  # on the GPU machine results come back through $OUT
        dest = Path(os.environ["OUT"]) / dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{out['machine']}, torch {out['torch']}, {args.size}x{args.size} float32, median of {args.repeats}\n")
    print("| operation | ms | vs cast |\n|---|---:|---:|")
    for r in results:
        print(f"| {r['label']} | {r['ms']:.2f} | {r['ratio_to_cast']:.2f}x |")


if __name__ == "__main__":
    main()

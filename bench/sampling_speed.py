"""How fast `generate:N` samples QAT training text, and whether the samples are the model's (issue 9).

    PYTHONPATH=src python bench/sampling_speed.py [--device cuda] [--configs dynamic:512,dynamic:2048,static:2048]

Each config is CACHE:BATCH: transformers' generate() with its default KV cache ("dynamic", grown by
concatenation each step) or a preallocated one ("static"), or lowbit's own decode loop ("loop",
lowbit.sampling.sample_batch: Gumbel-max draws, no step waits on the GPU), and the number of sequences
sampled together. (A "loopstatic" config, the loop on a static cache compiled into CUDA graphs, was
measured in bench/results/sampling_speed_cuda_loop.json and removed: slower.) Each samples one batch of --length tokens
from the BOS token of the default model (bf16), timed alone after a warm-up batch of the same config
(which pays any compilation and the memory pool's growth; its time is reported).
Check of the samples: under the model, sequences sampled from it have a mean NLL equal to the mean
entropy of its next-token distributions, up to sampling noise; the gap and its standard error are
reported for (up to) 64 sequences. In bf16 the sampling forward (with a KV cache) and the checking one
(without) round differently, by up to 0.7 in a log-probability on the CPU, so expect a gap of a few
standard errors either way. Sampling with the BOS hidden by an inferred mask, which
`sample_sequences` avoids, showed a gap of 0.17 nats (float32).
With --profile, the operators of 16 decode steps of the first config are printed, and the JSON
keeps the wall time of those steps, the time the GPU was busy and the top operators. Writes
bench/results/sampling_speed_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from accuracy import machine  # type: ignore[import-not-found]  # noqa: E402


def nll_minus_entropy(model, seqs: torch.Tensor) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Mean over tokens of (NLL of the sampled token - entropy of the distribution it came from), and
    its standard error: zero in expectation for samples from the model itself."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=seqs, use_cache=False).logits[:, :-1].float(), -1)
        gap = (-lp.gather(-1, seqs[:, 1:, None])[..., 0] + (lp.exp() * lp).sum(-1)).flatten()
    return float(gap.mean()), float(gap.std() / gap.numel() ** 0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", default="dynamic:512,dynamic:2048,static:2048")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--warmup-length", type=int, default=None,
                    help="tokens of the warm-up batch (default: --length). A shorter one leaves generate()'s timed "
                         "batch to grow the CUDA allocator's pool for its KV cache: on an H100 generate()'s first "
                         "full-length batch took twice as long as its later ones")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    from lowbit.eval.perf import peak_gpu_bytes
    from lowbit.models import load_model
    from lowbit.sampling import sample_sequences

    model, tok, _ = load_model("smollm2-135m", device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    for cfg in args.configs.split(","):
        cache, batch = cfg.split(":")
        impl = cache if cache == "static" else None
        method = "loop" if cache == "loop" else "generate"

        def run(length: int, batch: int = int(batch), impl: str | None = impl, method: str = method
                ) -> list[torch.Tensor]:
            return sample_sequences(model, tok, batch, length, per_call=batch, cache_implementation=impl,
                                    progress=False, method=method)

        torch.manual_seed(0)
        t0 = time.perf_counter()
        run(args.warmup_length or args.length)
        sync()
        warm = time.perf_counter() - t0
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        seqs = run(args.length)
        sync()
        sec = time.perf_counter() - t0
        row = {"cache": cache, "batch": int(batch), "length": args.length, "seconds": sec,
               "ms_per_sequence": 1000 * sec / int(batch), "tokens_per_s": int(batch) * args.length / sec,
               "warmup_seconds": warm,
               "peak_gib": (peak_gpu_bytes() or 0) / 2**30 if args.device.startswith("cuda") else None,
               }
        row["nll_minus_entropy_nats"], row["nll_minus_entropy_se"] = nll_minus_entropy(
            model, torch.stack(seqs[:64]).to(args.device))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        cache, batch = args.configs.split(",")[0].split(":")
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            sample_sequences(model, tok, int(batch), 17, per_call=int(batch), progress=False,
                             cache_implementation="static" if cache == "static" else None,
                             method="loop" if cache == "loop" else "generate")
            sync()
            wall = time.perf_counter() - t0
        cuda = args.device.startswith("cuda")
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        events = prof.key_averages()
        print(events.table(sort_by=key, row_limit=15), flush=True)

        def own_us(e) -> float:  # type: ignore[no-untyped-def]  # the event's own time on the device (or CPU)
            if not cuda:
                return float(e.self_cpu_time_total)
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))

        top = sorted(events, key=own_us, reverse=True)
        # on the GPU, only the device's own rows (kernels, copies): an operator's row carries its kernels' time
        # too, and summing both counted the GPU time twice (the first profile's busy_s, since corrected)
        busy = sum(own_us(e) for e in events
                   if not cuda or getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / 1e6
        # busy against wall: a GPU busy for much less than the wall time waits on the host (launches,
        # Python), and a faster sampler would need fewer host steps, not faster kernels
        profile_row = {"config": f"{cache}:{batch}", "decode_steps": 16, "wall_s": wall,
                       "busy_s": busy, "busy_of": "GPU kernels" if cuda else "CPU operators",
                       "top": [{"op": e.key, "self_s": own_us(e) / 1e6, "calls": e.count} for e in top[:12]]}
        print(json.dumps({k: v for k, v in profile_row.items() if k != "top"}), flush=True)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    out = REPO / "bench" / "results" / f"sampling_speed_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps({"date": date.today().isoformat(), "machine": machine(), "gpu": gpu,
                               "command": "python bench/sampling_speed.py " + " ".join(sys.argv[1:]),
                               "rows": rows, **({"profile": profile_row} if args.profile else {})},
                              indent=2) + "\n")
    print("\n| cache | batch | s | ms a sequence | tokens/s | warm-up s | NLL - entropy |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cache']} | {r['batch']} | {r['seconds']:.1f} | {r['ms_per_sequence']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['warmup_seconds']:.1f} | {r['nll_minus_entropy_nats']:+.3f} ± "
              f"{r['nll_minus_entropy_se']:.3f} |")


if __name__ == "__main__":
    main()

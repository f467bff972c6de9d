"""The `lowbit` command: parses arguments, calls the API, prints. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.scheme import WEIGHT_OBSERVERS, QuantArgs

log = logging.getLogger("lowbit")


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize LLMs to low-bit formats and measure the cost.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("doctor", parents=[common], help="what this machine runs natively (FP8? FP4?) and what it emulates")

    q = sub.add_parser("quantize", parents=[common], help="model + calibration data + scheme -> checkpoint")
    q.add_argument("model", nargs="?", default=None, help="built-in name, model directory or hub id (default smollm2-135m)")
    q.add_argument("--scheme", default="fp8", help="fp8 (static activation scales), fp8-dynamic (per-token), w8a8-int8 (INT8, per-token), "
                        "w4a16 (INT4 groups, weight-only) or w8a16 (INT8 per channel, weight-only)")
    q.add_argument("--calib", default="builtin", help="builtin | PATH (.txt paragraphs/lines, .jsonl) | hf:NAME")
    q.add_argument("--num-samples", type=_positive, default=512)
    q.add_argument("--max-length", type=_positive, default=512, help="tokens per sample (longer ones are cut)")
    q.add_argument("--min-length", type=_positive, default=16, help="samples shorter than this are dropped")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="join the text and cut windows of --max-length tokens in order (default: on for builtin)")
    q.add_argument("--skip-windows", type=int, default=0, metavar="N",
                   help="with --pack: start after the first N windows (hold them out, or try another slice)")
    q.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="seeded shuffle of samples before taking --num-samples (not with --pack)")
    q.add_argument("--observer", default=None, help="activation observer for static scales: minmax (default) | moving-minmax | percentile (99.99) | mse")
    q.add_argument("--weight-observer", choices=WEIGHT_OBSERVERS, default=None,
                   help="weight scales from an MSE search over amax * [0.8, 1] (default) or from amax (minmax)")
    q.add_argument("--weight-strategy", choices=["channel", "tensor"], default=None,
                   help="weight scales per output channel (default) or per tensor")
    q.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="keep matching Linear layers in high precision (glob on names, or re:REGEX); lm_head always")
    q.add_argument("--format", dest="layout", choices=["compressed-tensors", "autofp8"], default="compressed-tensors")
    q.add_argument("--output", "-o", required=True, type=Path)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    q.add_argument("--batch-size", type=_positive, default=1, help="calibration batch size (results do not depend on it)")
    q.add_argument("--keep-fraction", type=float, default=None, metavar="F",
                   help="mixed precision: keep at most this fraction of Linear weights in BF16, chosen by measured KL")
    q.add_argument("--budget-kl", type=float, default=None, metavar="X",
                   help="mixed precision: keep the fewest weights in BF16 for a predicted KL of at most X")
    q.add_argument("--candidates", default="", metavar="SCHEMES",
                   help="mixed precision: more schemes each layer may take instead of --scheme, comma-separated "
                        "(e.g. w8a8-int8); the one of least measured KL per layer wins, at the same memory")
    q.add_argument("--group-size", type=_positive, default=None,
                   help="w4a16: input channels per weight scale (default 128; must divide every quantized Linear's "
                        "input dimension, e.g. 64 for smollm2-135m's 576)")
    q.add_argument("--algorithm", default="rtn",
                   choices=["rtn", "gptq", "smoothquant", "smoothquant+gptq", "awq", "awq+gptq"],
                   help="rtn: round to nearest; the others run layer by layer, each layer seeing the error of the "
                        "ones before it: GPTQ error compensation, SmoothQuant outlier migration (W8A8), AWQ "
                        "activation-aware scales (weight-only), or a chain of two")
    q.add_argument("--gptq-damp", type=float, default=0.01, help="GPTQ: fraction of mean(diag H) added to H's diagonal")
    q.add_argument("--actorder", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: round columns by decreasing input energy (default: on for weights in groups)")
    q.add_argument("--smoothquant-alpha", type=float, default=0.5, help="SmoothQuant migration strength in [0, 1]")
    q.add_argument("--calibrate-all-experts", action="store_true",
                   help="MoE: also run every expert on every calibration token (observed only; outputs unchanged), "
                        "so rarely chosen experts get real statistics")
    q.add_argument("--stream", action="store_true",
                   help="models bigger than the machine: read layer by layer from the safetensors, write each "
                        "finished layer at once, resume an interrupted run (lowbit.runtime)")
    q.add_argument("--plan", action="store_true",
                   help="with --stream: print peak memory, disk and estimated time (one layer measured), then stop")
    q.add_argument("--gpus", type=_positive, default=None,
                   help="with --stream: calibrate on N GPUs (torch.distributed, NCCL)")
    q.add_argument("--ranks", type=_positive, default=1,
                   help="with --stream: N processes on the CPU (gloo), e.g. to check a multi-GPU run's result")
    q.add_argument("--activations-on-disk", action="store_true",
                   help="with --stream: keep the calibration activations on disk instead of in memory")
    q.add_argument("--allow-partial", action="store_true",
                   help="write the checkpoint even when the integrity gate fails, recording the failures in it")
    q.add_argument("--plan-windows", type=_positive, default=2,
                   help="calibration samples on which the KL of each layer is measured for the plan")

    i = sub.add_parser("inspect", parents=[common], help="per-layer error, KL attribution, calibration coverage -> report")
    i.add_argument("model", nargs="?", default=None, help="built-in name, model directory or hub id (default smollm2-135m)")
    i.add_argument("--scheme", default="fp8", help="fp8 | fp8-dynamic | w8a8-int8")
    i.add_argument("--calib", default="builtin", help="builtin | PATH | hf:NAME (as for quantize)")
    i.add_argument("--num-samples", type=_positive, default=64)
    i.add_argument("--max-length", type=_positive, default=512)
    i.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None)
    i.add_argument("--data", default=None, help="the use data (text file, builtin or hf:wikitext): coverage and KL windows")
    i.add_argument("--windows", type=_positive, default=16, help="windows of the use data for the coverage check")
    i.add_argument("--attribution-windows", type=_positive, default=2,
                   help="windows for the per-layer KL (one forward per layer each); 0 layers skipped with --no-attribution")
    i.add_argument("--no-attribution", action="store_true", help="skip the per-layer KL (the slow part)")
    i.add_argument("--seq-len", type=_positive, default=512)
    i.add_argument("--ignore", action="append", default=[], metavar="PATTERN")
    i.add_argument("--output", "-o", type=Path, required=True)
    i.add_argument("--overwrite", action="store_true")
    i.add_argument("--device", default=None)

    b = sub.add_parser("bench", parents=[common], help="GPU speed and memory: bf16 vs lowbit FP8 vs torchao, one run")
    b.add_argument("model", nargs="?", default=None,
                   help="model directory, hub id or built-in name (default smollm2-135m); or use --shape")
    b.add_argument("--shape", default=None, help="random weights of a real architecture: llama-3-8b, mistral-7b, ...")
    b.add_argument("--layers", type=_positive, default=None, help="with --shape: fewer decoder layers (quick runs)")
    b.add_argument("--variants", default="bf16,lowbit-fp8,lowbit-fp8-tensor,lowbit-fp8-dynamic,torchao-rowwise,"
                                         "torchao-tensorwise")
    b.add_argument("--prefill", default="1x2048,8x2048,32x512", help="batch x length points")
    b.add_argument("--decode-batches", default="1,32")
    b.add_argument("--decode-steps", type=_positive, default=64)
    b.add_argument("--gemm", action="store_true", help="also the GEMM-level table (4096^3, 8192^3, ...)")
    b.add_argument("--no-fuse", action="store_true",
                   help="lowbit: run q/k/v and gate/up as separate GEMMs (default: fused, as vLLM and lowbit.load run them)")
    b.add_argument("--compile", action="store_true",
                   help="time prefill of every variant (bf16 too) under torch.compile; decode stays on CUDA graphs")
    b.add_argument("--precise-accum", action="store_true",
                   help="lowbit: promote FP8 partial sums to float32 (default: Hopper's fast accumulation, as vLLM)")
    b.add_argument("--json", type=Path, default=None, help="also write every number to this file")

    t = sub.add_parser("qat", parents=[common],
                       help="quantization-aware training (distillation) -> the same checkpoint as quantize")
    t.add_argument("model", nargs="?", default=None, help="built-in name, model directory or hub id (default smollm2-135m)")
    t.add_argument("--scheme", default="w4a16", help="fp8, fp8-dynamic, w8a8-int8, w4a16, w8a16")
    t.add_argument("--group-size", type=_positive, default=None, help="group size for w4a16 (default 128)")
    t.add_argument("--data", default="builtin", help="builtin | PATH (text file) | generate:N (sampled from the model)")
    t.add_argument("--steps", type=_positive, default=200)
    t.add_argument("--batch-size", type=_positive, default=4)
    t.add_argument("--seq-len", type=_positive, default=256)
    t.add_argument("--lr", type=float, default=1e-5, help="learning rate of the weights")
    t.add_argument("--scale-lr", type=float, default=1e-4, help="learning rate of the quantization scales")
    from lowbit.algorithms.qat import LOSSES, TRAINABLE  # 17 ms more at start-up: torch is loaded already

    t.add_argument("--loss", choices=LOSSES, default="kd",
                   help="kd: KL to the original model's logits (default); ce: next-token cross-entropy; both; "
                        "+hidden: also match every decoder layer's output (relative squared error)")
    t.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the +hidden term (default 1)")
    t.add_argument("--train", choices=TRAINABLE, default="quantized",
                   help="quantized: the quantized layers' weights and scales (default); all: those and every other "
                        "parameter (embeddings, head, norms, biases); scales: only the quantization scales; lora: the "
                        "scales, the norms and LoRA adapters, merged before export (models that do not fit full "
                        "fine-tuning)")
    t.add_argument("--embed-lr", type=float, default=None,
                   help="--train all: learning rate of the embeddings and head (default: --lr)")
    t.add_argument("--lora-rank", type=_positive, default=16, help="rank of the LoRA adapters (--train lora)")
    t.add_argument("--lora-lr", type=float, default=1e-4, help="learning rate of the adapters and norms (--train lora)")
    t.add_argument("--eval-every", type=_positive, default=50, help="held-out loss every K steps")
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--learn-format", action="store_true",
                   help="fp8 schemes: learn each layer's exponent/mantissa split (Kuzmin et al. 2022) and report it; "
                        "the checkpoint holds E4M3 with the learned clipping ranges")
    t.add_argument("--format-lr", type=float, default=1e-2, help="learning rate of the mantissa bits (--learn-format)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the training step, one decoder layer compiled and reused by all "
                        "(GPU: fused kernels, about 3x eager after a ~30 s cold start; checked against eager)")
    t.add_argument("--from", dest="start", type=Path, default=None,
                   help="start from this post-training checkpoint (e.g. made with --algorithm gptq) of the same scheme")
    t.add_argument("--output", "-o", required=True, type=Path)
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--device", default=None)
    t.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("check", parents=[common],
                       help="integrity and vLLM compatibility of any compressed-tensors or AutoFP8 checkpoint")
    c.add_argument("checkpoint", type=Path, help="checkpoint directory (lowbit's or anyone's)")
    c.add_argument("--tp", default="1,2,4,8", help="tensor-parallel sizes to check the splits for")
    c.add_argument("--json", type=Path, default=None, help="also write the report to this file")

    e = sub.add_parser("eval", parents=[common], help="base vs quantized: perplexity, KL, top-1, size, latency")
    e.add_argument("quantized", type=Path, help="quantized checkpoint directory")
    e.add_argument("--base", default=None, help="the original model (default: the one recorded in the checkpoint)")
    e.add_argument("--data", default="builtin", help="builtin (held-out text) | PATH (text file) | hf:wikitext")
    e.add_argument("--windows", type=_positive, default=40)
    e.add_argument("--seq-len", type=_positive, default=512)
    e.add_argument("--batch-size", type=_positive, default=1)
    e.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    e.add_argument("--decode-tokens", type=_positive, default=32)
    e.add_argument("--device", default=None)
    e.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    f = sub.add_parser("formats", parents=[common], help="the number formats: table, explain, plot, compare on a model",
                       description="Without an action: a table of every named format.")
    fsub = f.add_subparsers(dest="action", metavar="ACTION")
    fl = fsub.add_parser("list", parents=[common], help="table of every named format (the default)")
    fl.add_argument("--json", type=Path, default=None, help="also write the table to this file")
    fe = fsub.add_parser("explain", parents=[common], help="where a format's range comes from, step by step")
    fe.add_argument("name", help="e4m3, e5m2, e2m1, e8m0, int8, nf4, mxfp4, nvfp4, bf16, or any eXmY[fn|fnuz|finite][_bBIAS]")
    fp = fsub.add_parser("plot", parents=[common], help="representable values (log axis) and relative error")
    fp.add_argument("names", nargs="+", metavar="NAME")
    fp.add_argument("--output", "-o", type=Path, required=True, help="image file (.png, .svg or .pdf)")
    fc = fsub.add_parser("compare", parents=[common], help="per Linear layer: outliers and SQNR of each candidate format")
    fc.add_argument("model", nargs="?", default=None, help="built-in name, model directory or hub id (default smollm2-135m)")
    fc.add_argument("--calib", default="builtin", help="builtin | PATH (.txt, .jsonl) | hf:NAME")
    fc.add_argument("--num-samples", type=_positive, default=8)
    fc.add_argument("--max-length", type=_positive, default=512)
    fc.add_argument("--seed", type=int, default=0)
    fc.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                    help="join the text and cut windows of --max-length tokens (default: on for builtin)")
    fc.add_argument("--ignore", action="append", default=[], metavar="PATTERN", help="skip matching Linear layers")
    fc.add_argument("--output", "-o", type=Path, default=None,
                    help="directory for formats_compare.json, .md (every layer) and .png")
    fc.add_argument("--overwrite", action="store_true")
    fc.add_argument("--device", default=None)
    return p


def _device(arg: str | None) -> str:
    import torch

    if arg:
        if arg.startswith("cuda") and not torch.cuda.is_available():
            raise LowbitError(f"--device {arg}: no CUDA device is available here")
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_doctor(args: argparse.Namespace) -> int:
    from lowbit.doctor import diagnose, format_report

    print(format_report(diagnose()))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.api import quantize
    from lowbit.calibration.data import CalibConfig
    from lowbit.table import render

    calib = CalibConfig(
        source=args.calib, num_samples=args.num_samples, max_length=args.max_length, min_length=args.min_length,
        seed=args.seed, pack=args.pack, shuffle=args.shuffle, skip_windows=args.skip_windows,
    )
    if args.stream or args.plan or args.gpus or args.ranks > 1 or args.activations_on_disk:
        return _quantize_streaming(args, calib)
    res = quantize(
        args.model, output=args.output, scheme=args.scheme, calib=calib, ignore=args.ignore, observer=args.observer,
        weight_strategy=args.weight_strategy, weight_observer=args.weight_observer, layout=args.layout, overwrite=args.overwrite,
        device=_device(args.device), batch_size=args.batch_size, progress=not args.quiet,
        keep_fraction=args.keep_fraction, budget_kl=args.budget_kl, plan_windows=args.plan_windows,
        candidates=[c.strip() for c in args.candidates.split(",") if c.strip()],
        group_size=args.group_size, algorithm=args.algorithm, gptq_damp=args.gptq_damp, gptq_actorder=args.actorder,
        smoothquant_alpha=args.smoothquant_alpha, calibrate_all_experts=args.calibrate_all_experts,
        allow_partial=args.allow_partial,
    )
    p = res.provenance
    recipe = p["recipe"]
    w = QuantArgs(**recipe["weights"])
    a = QuantArgs(**recipe["input_activations"]) if recipe["input_activations"] else None
    rows: list[list[Any]] = [
        ["model", p["base_model"]],
        ["scheme", f"{p['scheme']} ({p['layout']})"],
        ["weights", w.describe()],
        ["activations", a.describe() if a else "not quantized"],
    ]
    if p.get("algorithm_report"):
        ar = p["algorithm_report"]
        gain = ar.get("gptq_error_vs_rtn_median")
        rows.append(["algorithm", p["algorithm"] + ", layer by layer"
                     + (f"; GPTQ output error vs round-to-nearest: median {gain:.2f}x" if gain is not None else "")])
    if p.get("calibration"):
        c = p["calibration"]
        rows += [
            ["calibration", f"{c['num_samples']} samples, {c['num_tokens']} tokens from {c['source']}"],
            ["", f"truncated {c['truncated']}, dropped short {c['dropped_short']}, chat template {c['chat_template_applied']}"],
        ]
    if p.get("mixed_precision"):
        mp = p["mixed_precision"]
        per = ", ".join(f"{s} {n}" for s, n in mp["layers_per_scheme"].items())
        rows.append(["mixed precision", f"{len(mp['keep'])} layers kept in BF16 ({100 * mp['kept_fraction']:.2f}% of Linear "
                     f"weights); quantized layers: {per}"])
        rows.append(["", f"predicted KL {mp['predicted_kl']:.4f} vs {mp['kl_all_quantized']:.4f} all {mp['primary_scheme']}"])
    rows.append(["quantized", f"{p['quantized_modules']} Linear layers; kept high precision: "
                              f"{_short_list(p['ignored'])}"])
    for kind, row in sorted(p.get("integrity", {}).get("coverage", {}).items()):
        share = row["quantized_params"] / row["targeted_params"] if row["targeted_params"] else 1.0
        rows.append(["", f"{kind}: {row['quantized_params']:,} of {row['targeted_params']:,} targeted parameters "
                         f"({100 * share:.1f}%)"])
    if p.get("tokens_per_expert"):
        counts = [c for cs in p["tokens_per_expert"].values() for c in cs]
        rows.append(["experts", f"{len(counts)} experts in {len(p['tokens_per_expert'])} layers; calibration tokens "
                                f"routed per expert: min {min(counts)}, max {max(counts)}"
                                + (", every expert also saw every token" if p.get("calibrate_all_experts") else "")])
        if p.get("experts_without_tokens"):
            rows.append(["", f"{len(p['experts_without_tokens'])} expert projections saw no token and take their "
                             f"layer's largest input scale (e.g. {p['experts_without_tokens'][0]})"])
    failures = p.get("integrity", {}).get("failures") or []
    rows.append(["integrity", "passed" if not failures else f"FAILED {len(failures)} check(s), written anyway "
                                                          "(--allow-partial): " + "; ".join(failures)])
    base = p.get("base_model_bytes")
    size = f"{res.output} ({p['checkpoint_bytes'] / 2**20:.1f} MiB"
    size += f", {p['checkpoint_bytes'] / base:.2f}x the original's {base / 2**20:.1f} MiB)" if base else ")"
    rows += [
        ["time", ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items())],
        ["checkpoint", size],
    ]
    print(render(rows))
    return 0


def _quantize_streaming(args: argparse.Namespace, calib: Any) -> int:
    """`quantize --stream`: lowbit.runtime.quantize_streaming, layer by layer from disk, resumable."""
    from lowbit.runtime import quantize_streaming
    from lowbit.runtime.plan import Plan
    from lowbit.scheme import get_scheme
    from lowbit.table import render

    if not args.stream:
        raise LowbitError("--plan, --gpus, --ranks and --activations-on-disk belong to --stream runs: add --stream")
    if args.keep_fraction is not None or args.budget_kl is not None or args.candidates:
        raise LowbitError("a mixed-precision plan measures the whole model at once: it cannot run with --stream")
    strategy = args.weight_strategy or ("tensor" if args.layout == "autofp8" else None)
    scheme = get_scheme(args.scheme, weight_strategy=strategy, observer=args.observer,
                        weight_observer=args.weight_observer, group_size=args.group_size)
    r = quantize_streaming(
        args.model, args.output, scheme, None, algorithm=args.algorithm, ignore=args.ignore,
        activations_on_disk=args.activations_on_disk, ranks=args.ranks, gpus=args.gpus,
        device=None if args.gpus else _device(args.device), plan_only=args.plan, progress=not args.quiet,
        overwrite=args.overwrite, layout=args.layout, gptq_damp=args.gptq_damp, gptq_actorder=args.actorder,
        smoothquant_alpha=args.smoothquant_alpha, calibrate_all_experts=args.calibrate_all_experts, calib=calib,
    )
    if "rank" in r and r.get("rank"):  # torchrun: only rank 0 reports
        return 0
    if args.plan:
        plan = Plan(**r["plan"])
        print(render(plan.rows()))
        return 0 if plan.fits is not False else 2
    st = r.get("streaming", {})
    rows: list[list[Any]] = [
        ["model", r.get("base_model", args.model)],
        ["scheme", f"{r.get('scheme')} ({args.layout}), {r.get('algorithm', args.algorithm)}, streamed layer by layer"],
        ["peak memory", f"host {st.get('peak_host_bytes_rank0', 0) / 2**30:.2f} GiB (rank 0)"
                        + (f", GPU {st['peak_gpu_bytes'] / 2**30:.2f} GiB" if st.get("peak_gpu_bytes") else "")],
        ["resumed", f"after {st['resumed_after_units']} finished units" if st.get("resumed_after_units") else "no"],
        ["time", ", ".join(f"{k} {v:.1f}s" for k, v in r.get("seconds", {}).items())],
        ["checkpoint", f"{args.output} ({st.get('shards', '?')} shards); run `lowbit check` on it for the full "
                       "integrity report"],
    ]
    print(render(rows))
    return 0


def _short_list(names: list[str], n: int = 6) -> str:
    if not names:
        return "-"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.eval.run import evaluate, format_eval

    result = evaluate(
        args.quantized, base=args.base, data=args.data, windows=args.windows, seq_len=args.seq_len,
        batch_size=args.batch_size, latency=not args.no_latency, decode_tokens=args.decode_tokens,
        device=_device(args.device), progress=not args.quiet,
    )
    print(format_eval(result))
    if args.json:
        from lowbit.checkpoint.io import write_json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        write_json(tmp, result)
        os.replace(tmp, args.json)
    return 0


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple((int(a), int(b)) for a, b in (p.lower().split("x") for p in text.split(",") if p))
    except ValueError:
        raise LowbitError(f"--prefill {text!r}: give BATCHxLENGTH points, e.g. 1x2048,8x2048") from None
    if not out or any(a < 1 or b < 1 for a, b in out):
        raise LowbitError(f"--prefill {text!r}: give BATCHxLENGTH points with positive numbers")
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from lowbit.eval.bench import VARIANTS, gemm_table, run_bench

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise LowbitError(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    points = _pairs(args.prefill)
    try:
        batches = tuple(int(b) for b in args.decode_batches.split(",") if b)
    except ValueError:
        raise LowbitError(f"--decode-batches {args.decode_batches!r}: give batch sizes, e.g. 1,32") from None
    if not torch.cuda.is_available():
        raise LowbitError("lowbit bench measures GPU speed and needs a CUDA GPU (none found); "
                          "`lowbit eval` measures accuracy and CPU latency")
    if args.shape and args.model:
        raise LowbitError("give a model or --shape, not both")
    if args.shape:
        from lowbit.models.shapes import build_random

        over = {"num_hidden_layers": args.layers} if args.layers else {}
        base = build_random(args.shape, device="cuda", **over)
        name = args.shape + (f" ({args.layers} layers)" if args.layers else "")
    else:
        from lowbit.models import load_model

        base, _, src = load_model(args.model, dtype=torch.bfloat16, device="cuda")
        name = str(src)
    result = run_bench(base, variants=variants, prefill_points=points, decode_batches=batches,
                       decode_steps=args.decode_steps, progress=not args.quiet, fuse=not args.no_fuse,
                       fast_accum=not args.precise_accum, compile_prefill=args.compile)
    result["model"] = name
    if args.gemm:
        result["gemm"] = gemm_table()
    print(format_bench(result))
    if args.json:
        from lowbit.checkpoint.io import write_json

        write_json(args.json, result)
    return 0


def format_bench(r: dict[str, Any]) -> str:
    """The bench result as Markdown tables: absolute numbers and speedups against bf16."""
    rows = r["rows"]
    base = next((x for x in rows if x["variant"] == "bf16"), None)
    lines = [f"{r['model']} on {r['gpu']} (torch {r['torch']})", ""]
    if "lowbit_fused" in r:
        lines[0] += (f"; lowbit: {'fused q/k/v and gate/up' if r['lowbit_fused'] else 'unfused'}, "
                     f"{'fast' if r['lowbit_fast_accum'] else 'float32-promoted'} FP8 accumulation")
    if r.get("prefill_compiled"):
        lines[0] += "; prefill under torch.compile (every variant)"
    head = ["variant", "model GiB", "peak GiB"]
    head += [f"prefill {p['batch']}x{p['length']} ms" for p in rows[0]["prefill"]]
    head += [f"decode b{d['batch']} ms/tok (p50/p99)" for d in rows[0]["decode"]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in rows:
        cells = [x["variant"], f"{x['model_bytes'] / 2**30:.2f}", f"{x['peak_gpu_bytes'] / 2**30:.2f}"]
        for i, p in enumerate(x["prefill"]):
            sp = f" ({base['prefill'][i]['mean_ms'] / p['mean_ms']:.2f}x)" if base else ""
            cells.append(f"{p['mean_ms']:.2f}{sp}")
        for i, d in enumerate(x["decode"]):
            sp = f" ({base['decode'][i]['mean_ms'] / d['mean_ms']:.2f}x)" if base else ""
            cells.append(f"{d['p50_ms']:.3f}/{d['p99_ms']:.3f}{sp}")
        lines.append("| " + " | ".join(cells) + " |")
    if any("joules_per_token" in p for x in rows for p in x["prefill"] + x["decode"]):
        lines += ["", "energy per token (NVML counter, timed runs only), joules:", ""]
        cols = [f"prefill {p['batch']}x{p['length']}" for p in rows[0]["prefill"]]
        cols += [f"decode b{d['batch']}" for d in rows[0]["decode"]]
        lines += ["| variant | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for x in rows:
            vals = [p.get("joules_per_token") for p in x["prefill"] + x["decode"]]
            lines.append(f"| {x['variant']} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    modes = {d["mode"] for x in rows for d in x["decode"]}
    lines.append("")
    lines.append(f"decode timing: {', '.join(sorted(modes))}; speedups (in brackets) are mean latency of bf16 / variant")
    for x in rows:
        if "native" in x:
            lines.append(f"{x['variant']}: {x['native']}")
    for v, why in r.get("skipped", {}).items():
        lines.append(f"{v}: skipped ({why})")
    if r.get("gemm"):
        lines += ["", "GEMM level (CUDA graph replays; speedup against bf16):", "",
                  "| M x K x N | bf16 ms | lowbit FP8 static per-tensor | (precise accumulation) | "
                  "lowbit FP8 dynamic per-token | bare _scaled_mm | (precise) | torchao row-wise | torchao tensor-wise |",
                  "|---|---|---|---|---|---|---|---|---|"]
        keys = ("fp8_static_tensor_speedup", "fp8_static_tensor_precise_speedup", "fp8_dynamic_row_speedup",
                "scaled_mm_only_speedup", "scaled_mm_only_precise_speedup", "torchao-rowwise_speedup",
                "torchao-tensorwise_speedup")
        for g in r["gemm"]:
            cells = [f"{g[k]:.2f}x" if k in g else "-" for k in keys]
            lines.append(f"| {g['M']}x{g['K']}x{g['N']} | {g['bf16_ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from lowbit.analysis.inspect import inspect_model
    from lowbit.analysis.inspect_report import summary_text, write_inspect_report
    from lowbit.calibration.data import CalibConfig, load_calibration, read_text_source, token_windows
    from lowbit.checkpoint.io import check_output
    from lowbit.models import load_model
    from lowbit.scheme import get_scheme

    check_output(args.output, args.overwrite)
    scheme = get_scheme(args.scheme)
    model, tok, src = load_model(args.model, device=_device(args.device))
    calib = load_calibration(
        CalibConfig(source=args.calib, num_samples=args.num_samples, max_length=args.max_length,
                    min_length=min(16, args.max_length), pack=args.pack),
        tok,
    )
    use = None
    if args.data is not None:
        text, _ = read_text_source(args.data)
        use = token_windows(text, tok, args.seq_len, args.windows + (0 if args.no_attribution else args.attribution_windows))
    if args.no_attribution:
        attr_windows, attr_src = None, ""
    elif use is not None:  # the last windows of the use data: not the ones of the coverage check
        attr_windows, use = use[args.windows:], use[: args.windows]
        attr_src = f"{args.data}, windows {args.windows}..{args.windows + args.attribution_windows - 1}"
    else:
        length = min(len(s) for s in calib.samples[: args.attribution_windows])
        attr_windows = torch.stack([s[:length] for s in calib.samples[: args.attribution_windows]])
        attr_src = f"the first {args.attribution_windows} calibration samples"
    result = inspect_model(
        model, scheme, calib.samples, attribution_windows=attr_windows, use_windows=use, ignore=args.ignore,
        progress=not args.quiet,
        meta={"model": str(src), "calibration": f"{len(calib.samples)} samples, {calib.num_tokens} tokens from {calib.source}",
              "data": None if args.data is None else f"{args.data}, {args.windows} x {args.seq_len} tokens",
              "attribution": attr_src},
    )
    write_inspect_report(result, args.output, overwrite=args.overwrite)
    print(summary_text(result))
    print(f"\nreport: {args.output / 'report.html'} (and report.md, report.json)")
    return 0


def _get_format(name: str) -> Any:
    from lowbit.formats.registry import get_format

    try:
        return get_format(name)
    except ValueError as e:
        raise LowbitError(str(e)) from None


def cmd_formats(args: argparse.Namespace) -> int:
    from lowbit.table import render

    action = args.action or "list"
    if action == "list":
        from lowbit.formats.registry import table_rows

        rows = table_rows()
        cols = ["name", "kind", "bits", "ebits", "mbits", "bias", "specials", "max", "min_normal", "min_subnormal",
                "finite_values", "relative_step", "bits_per_value"]
        heads = ["name", "kind", "bits", "E", "M", "bias", "inf/NaN", "max", "min normal", "min subnormal",
                 "finite values", "rel. step", "bits/value"]
        print(render([["-" if r[c] is None else r[c] for c in cols] for r in rows], heads))
        print("\nrel. step: grid spacing relative to a binade's start (2^-M), for integers 1/qmax, for nf4 the widest gap."
              "\nBlock formats (mx*, nvfp4) show their element grid, before the block scale; nf4 its levels in [-1, 1];"
              "\nbits/value counts the block scales. `lowbit formats explain NAME` derives any of these numbers.")
        if getattr(args, "json", None):
            from lowbit.checkpoint.io import write_json

            write_json(args.json, rows)
        return 0
    if action == "explain":
        from lowbit.formats.registry import explain

        print(explain(_get_format(args.name)))
        return 0
    if action == "plot":
        from lowbit.formats.plot import plot_formats

        fmts = [_get_format(n) for n in args.names]
        if args.output.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise LowbitError(f"--output {args.output}: give a .png, .svg or .pdf file")
        print(f"wrote {plot_formats(fmts, args.output)}")
        return 0
    return _formats_compare(args)


def _formats_compare(args: argparse.Namespace) -> int:
    from lowbit.analysis.format_compare import compare_formats
    from lowbit.analysis.format_report import finding_table, summary_table, write_report
    from lowbit.calibration.data import CalibConfig, load_calibration
    from lowbit.checkpoint.io import check_output
    from lowbit.models import load_model
    from lowbit.targets import select_linears

    if args.output is not None:
        check_output(args.output, args.overwrite)
    model, tok, src = load_model(args.model, device=_device(args.device))
    calib = load_calibration(
        CalibConfig(source=args.calib, num_samples=args.num_samples, max_length=args.max_length,
                    min_length=min(16, args.max_length), seed=args.seed, pack=args.pack),
        tok,
    )
    targets, _ = select_linears(model, args.ignore)
    result = compare_formats(model, calib.samples, targets=targets, progress=not args.quiet)
    result["meta"] = {
        "model": str(src),
        "calibration": f"{len(calib.samples)} samples, {calib.num_tokens} tokens from {calib.source}",
        "calibration_summary": calib.summary(),
    }
    print(summary_table(result))
    print()
    print(finding_table(result))
    if args.output is not None:
        write_report(result, args.output, overwrite=args.overwrite)
        print(f"\nevery layer: {args.output / 'formats_compare.md'}; plot and JSON beside it")
    return 0


def cmd_qat(args: argparse.Namespace) -> int:
    from lowbit.algorithms.qat import QATConfig
    from lowbit.qat_run import qat
    from lowbit.table import render

    cfg = QATConfig(steps=args.steps, lr=args.lr, scale_lr=args.scale_lr, batch_size=args.batch_size,
                    warmup=args.warmup, loss=args.loss, hidden_weight=args.hidden_weight, train=args.train, eval_every=args.eval_every, seed=args.seed,
                    gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                    learn_format=args.learn_format, format_lr=args.format_lr, lora_rank=args.lora_rank,
                    lora_lr=args.lora_lr, embed_lr=args.embed_lr)
    res = qat(args.model, output=args.output, scheme=args.scheme, group_size=args.group_size, data=args.data,
              seq_len=args.seq_len, config=cfg, start=args.start, device=_device(args.device), overwrite=args.overwrite,
              progress=not args.quiet)
    p = res.provenance
    q = p["qat"]
    curve = q["loss_curve"]
    held = ", ".join(f"{s}: {v:.4f}" for s, v in zip(curve["eval_steps"], curve["eval_loss"], strict=True)) or "-"
    rows: list[list[Any]] = [
        ["model", p["base_model"]],
        ["scheme", f"{p['scheme']}, {p['algorithm']}"],
        ["training", f"{len(curve['steps'])} steps, {q['tokens']:,} tokens of {q['data']} ({q['loss']} loss), "
                     f"lr {q['lr']:g} / scales {q['scale_lr']:g}"],
        ["loss", f"{curve['loss'][0]:.4f} -> {curve['loss'][-1]:.4f}; held-out {held}"],
        *([["learned formats", _format_summary(q["learned_formats"])]] if q.get("learned_formats") else []),
        ["integrity", "passed" if p.get("integrity", {}).get("passed") else str(p.get("integrity"))],
        ["time", ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items())],
        ["checkpoint", f"{res.output} ({p['checkpoint_bytes'] / 2**20:.1f} MiB); loss curve qat_loss.png"],
    ]
    print(render(rows))
    return 0


def _format_summary(formats: dict[str, dict[str, str]]) -> str:
    """'weights: 200 E4M3, 10 E5M2; inputs: ...; exported as E4M3' from {layer: {kind: format}}."""
    from collections import Counter

    parts = []
    for kind in ("weight", "input"):
        counts = Counter(f[kind] for f in formats.values() if kind in f)
        if counts:
            parts.append(f"{kind}s: " + ", ".join(f"{n} {name}" for name, n in counts.most_common()))
    return "; ".join(parts) + "; exported as E4M3 (learned_formats.png)"


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when the checkpoint passes; 2 when it fails (the report says why) or is not a checkpoint."""
    from lowbit.checkpoint.check import check_directory, format_report

    try:
        tp = tuple(int(t) for t in args.tp.split(",") if t.strip())
    except ValueError:
        raise LowbitError(f"--tp {args.tp!r}: give tensor-parallel sizes, e.g. 1,2,4,8") from None
    if not tp or min(tp) < 1:
        raise LowbitError(f"--tp {args.tp!r}: sizes must be positive integers")
    report = check_directory(args.checkpoint, tp=tp)
    print(format_report(report))
    if args.json:
        from lowbit.checkpoint.io import write_json

        write_json(args.json, report.to_dict())
    return 0 if report.ok else 2


COMMANDS = {"doctor": cmd_doctor, "quantize": cmd_quantize, "eval": cmd_eval, "formats": cmd_formats,
            "inspect": cmd_inspect, "bench": cmd_bench, "check": cmd_check, "qat": cmd_qat}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="lowbit: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "compressed_tensors", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return COMMANDS[args.command](args)
    except LowbitError as e:
        if args.debug:
            raise
        print(f"lowbit: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # an output path that cannot be written, a file where a directory should be
        if args.debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"lowbit: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "qat":
            print("lowbit: interrupted; the training state is saved beside the output (.<output>.qat-state.pt): "
                  "run the same command again to resume", file=sys.stderr)
        elif getattr(args, "stream", False):
            print("lowbit: interrupted; the finished layers are kept beside the output (<output>.lowbit-partial): "
                  "run the same command again to resume", file=sys.stderr)
        else:
            print("lowbit: interrupted; no partial output was left in place", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

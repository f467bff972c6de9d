"""Quantization-aware training on smollm2-135m against lowbit's best post-training result (issue 9).

    PYTHONPATH=src python bench/qat.py [--device cuda] [--steps 300] [--runs 'w4a16;fp8']

For each scheme: the post-training baseline (W4A16 groups of 64: GPTQ with activation ordering,
lowbit's best there; static FP8: GPTQ), then QAT started from that checkpoint (`lowbit qat --from`),
distilling from the original on the shared calibration text (../shared/data/calibration/
groups_merged.txt, 512-token windows). Evaluation: the first 40 windows of 512 tokens of
../shared/data/wikitext-2-raw/wiki.test.raw (never trained on), each checkpoint reloaded and run by
lowbit's emulation (on a GPU too), against the original in bf16. Recovery = 1 - (QAT gap / PTQ gap),
for the perplexity gap (ppl / bf16 ppl - 1) and for the KL. Writes bench/results/qat.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from accuracy import CALIB, WIKI, machine  # type: ignore[import-not-found]  # noqa: E402

# label -> (scheme, group size, post-training algorithm, its extra quantize() arguments)
RUNS = {
    "w4a16": ("w4a16", 64, "gptq", {"gptq_actorder": True}),
    "fp8": ("fp8", None, "gptq", {}),
}


def _reset_peak(device: str) -> None:
    """Start a new peak: the GPU allocator's, or the process's resident high-water mark (Linux: writing 5
    to /proc/self/clear_refs resets VmHWM)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def _peak(device: str) -> int:
    from lowbit.eval.perf import (
        peak_gpu_bytes,
        peak_rss_bytes,  # VmHWM, which _reset_peak resets
    )

    return (peak_gpu_bytes() or 0) if device.startswith("cuda") else peak_rss_bytes()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--runs", default="w4a16;fp8")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", default="1e-5", help="weight learning rate(s), comma-separated: one QAT run each")
    ap.add_argument("--scale-lr", default="1e-4", help="learning rate(s) of the log-scales, comma-separated")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--data", default=None, help="QAT training data (default: the shared calibration text); "
                    "sources joined by commas, e.g. PATH,generate:4096")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--loss", default="kd", help="kd, kd+hidden, ... (lowbit qat --loss)")
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--train", default="quantized",
                    help="what trains, comma-separated (quantized, all, scales, lora): one QAT run each")
    ap.add_argument("--embed-lr", default="",
                    help="--train all: learning rate(s) of the embeddings and head, comma-separated (default: --lr)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-lr", type=float, default=1e-4)
    ap.add_argument("--work", type=Path, default=None, help="keep checkpoints here; reuse a post-training one found there")
    ap.add_argument("--json", default="qat.json", help="file name under bench/results/, or a path")
    args = ap.parse_args()

    import torch

    import lowbit
    from lowbit.algorithms.qat import QATConfig
    from lowbit.calibration.data import CalibConfig
    from lowbit.eval.run import evaluate
    from lowbit.models import resolve_model
    from lowbit.qat_run import qat

    base_dir = resolve_model("smollm2-135m")
    work = args.work or Path(tempfile.mkdtemp(prefix="lowbit-qat-"))
    work.mkdir(parents=True, exist_ok=True)
    data = args.data or str(CALIB)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict] = []
    out = Path(args.json) if "/" in args.json else REPO / "bench" / "results" / args.json
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict]) -> None:  # after every row: a run cut off keeps what it finished
        result = {"date": date.today().isoformat(), "machine": machine(), "device": device,
                  "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                  "lowbit": lowbit.__version__, "torch": str(torch.__version__), "command": "python bench/qat.py " + " ".join(sys.argv[1:]),
                  "training": f"{data}, {args.seq_len}-token windows, loss {args.loss} against bf16"
                              + (f" (hidden weight {args.hidden_weight:g})" if "hidden" in args.loss else ""),
                  "evaluation": f"{WIKI.name}: {args.windows} x 512 tokens, bf16 emulation", "rows": rows}
        out.write_text(json.dumps(result, indent=2) + "\n")

    def ev(ckpt: Path) -> dict:
        r = evaluate(ckpt, base=str(base_dir), data=str(WIKI), windows=args.windows, seq_len=512, latency=False,
                     progress=False, device=device, native=False)
        a = r["accuracy"]
        return {"ppl_base": a["ppl_base"], "ppl": a["ppl_quant"], "ppl_delta_pct": a["ppl_delta_pct"],
                "kl_mean": a["kl_mean"], "top1": a["top1_agreement"]}

    for label in [r.strip() for r in args.runs.split(";") if r.strip()]:
        scheme, group, algorithm, kw = RUNS[label]
        t0 = time.perf_counter()
        ptq_dir = work / f"{label}-ptq"
        if not ptq_dir.exists():
            lowbit.quantize(str(base_dir), output=ptq_dir, scheme=scheme, group_size=group,
                            calib=CalibConfig(source=str(CALIB), num_samples=args.calib_samples, max_length=512,
                                              pack=True),
                            algorithm=algorithm, device=device, progress=False, **kw)
        ptq_s = time.perf_counter() - t0
        base_row = {"run": f"{label} post-training ({algorithm})", "seconds": ptq_s, **ev(ptq_dir)}
        print(json.dumps(base_row), flush=True)
        rows.append(base_row)
        write(rows)
        embed_lrs = [float(e) for e in args.embed_lr.split(",") if e.strip()] or [None]
        for lr, scale_lr, mode, embed_lr in [(float(x), float(y), m.strip(), e) for x in args.lr.split(",")
                                             for y in args.scale_lr.split(",") for m in args.train.split(",")
                                             for e in (embed_lrs if m.strip() == "all" else [None])]:
            cfg = QATConfig(steps=args.steps, lr=lr, scale_lr=scale_lr, batch_size=args.batch_size, embed_lr=embed_lr,
                            eval_every=max(1, args.steps // 5), warmup=args.warmup, compile=args.compile, train=mode,
                            loss=args.loss, hidden_weight=args.hidden_weight,
                            lora_rank=args.lora_rank, lora_lr=args.lora_lr,
                            gradient_checkpointing=args.gradient_checkpointing)
            _reset_peak(device)
            t0 = time.perf_counter()
            res = qat(str(base_dir), output=work / f"{label}-qat-{lr:g}-{scale_lr:g}-{mode}{'' if embed_lr is None else f'-{embed_lr:g}'}", scheme=scheme,
                      group_size=group,
                      data=data, seq_len=args.seq_len, config=cfg, start=ptq_dir, device=device,
                      progress=False, overwrite=True)
            qat_s = time.perf_counter() - t0
            q = res.provenance["qat"]
            what = {"quantized": f"lr {lr:g}, scale lr {scale_lr:g}",
                    "all": f"every parameter, lr {lr:g}, scale lr {scale_lr:g}, embeddings lr "
                           f"{lr if embed_lr is None else embed_lr:g}",
                    "scales": f"scales only, lr {scale_lr:g}",
                    "lora": f"scales (lr {scale_lr:g}), norms and LoRA rank {args.lora_rank}, lr {args.lora_lr:g}"}[mode]
            if args.loss != "kd":
                what += f", loss {args.loss}" + (f" x{args.hidden_weight:g}" if "hidden" in args.loss else "")
            qat_row = {"run": f"{label} QAT from {algorithm}, {what}", "seconds": qat_s, "train": mode, "gradient_checkpointing": args.gradient_checkpointing,
                       "train_seconds": res.seconds["train"], "steps": args.steps, "tokens": q["tokens"], "lr": lr,
                       "scale_lr": scale_lr, "batch": f"{args.batch_size} x {args.seq_len}",
                       "held_out_loss": q["loss_curve"]["eval_loss"],
                       "train_loss_before_eval": _train_loss_at_evals(q["loss_curve"]), "data": data, "compile": q["loss_curve"]["compiled"],
                       "seconds_by_phase": res.seconds, "train_samples": q["train_samples"],
                       "peak_memory_bytes": _peak(device), "peak_memory_of": "GPU allocated" if device.startswith(
                           "cuda") else "process resident (VmHWM, reset before the run)", **ev(res.output)}
            if mode == "lora":
                qat_row.update(lora_rank=args.lora_rank, lora_lr=args.lora_lr)
            if mode == "all":
                qat_row.update(embed_lr=lr if embed_lr is None else embed_lr)
            for key, gap in (("ppl", lambda r: r["ppl"] / r["ppl_base"] - 1), ("kl", lambda r: r["kl_mean"])):
                g0, g1 = gap(base_row), gap(qat_row)
                qat_row[f"{key}_gap_recovered"] = 1 - g1 / g0 if g0 > 0 else None
            print(json.dumps(qat_row), flush=True)
            rows.append(qat_row)
            write(rows)
    write(rows)
    table(rows)


def _train_loss_at_evals(curve: dict) -> list[float]:
    """The mean training loss over the steps since the previous held-out evaluation, at each one:
    beside the held-out loss it tells overfitting (training loss falling, held-out not) from a plateau."""
    out, last = [], 0
    for step in curve["eval_steps"]:
        window = (curve.get("logit_loss") or curve["loss"])[last:step]  # +hidden: the part the held-out loss has
        out.append(sum(window) / len(window) if window else float("nan"))
        last = step
    return out


def table(rows: list[dict]) -> None:
    print("\n| run | ppl | ppl delta | KL | top-1 | recovered (ppl gap / KL) | seconds | peak GiB |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rec = (f"{100 * r['ppl_gap_recovered']:.0f}% / {100 * r['kl_gap_recovered']:.0f}%"
               if r.get("ppl_gap_recovered") is not None else "-")
        print(f"| {r['run']} | {r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f}% | {r['kl_mean']:.4f} | "
              f"{100 * r['top1']:.2f}% | {rec} | {r['seconds']:.0f} | "
              + (f"{r['peak_memory_bytes'] / 2**30:.2f} |" if "peak_memory_bytes" in r else "- |"))


if __name__ == "__main__":
    main()

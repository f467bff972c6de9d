"""Kuzmin et al. 2022 on the default model (issue 9): INT8 against FP8 E4M3, post-training and after
an equal QAT budget, and the exponent bits each layer learns.

    PYTHONPATH=src python bench/kuzmin.py [--steps 80] [--batch-size 4] [--seq-len 128] [--device cpu]

Both schemes are W8A8 with the same granularity, as vLLM runs them: per-channel weights and
per-token dynamic activations (`w8a8-int8`, `fp8-dynamic`), round to nearest with lowbit's MSE
weight scales. QAT: distillation from the bf16 original on the shared calibration text, the same
steps, batch and learning rate for each; `--learn-format` adds a third run in which every layer
also learns its exponent/mantissa split (weights and inputs separately) and its clipping range.
Evaluation: the first --windows windows of 512 tokens of wikitext-2 test, never trained on, each
checkpoint reloaded and run by lowbit's emulation. Writes bench/results/kuzmin.json and
docs/img/learned_formats.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from accuracy import CALIB, WIKI, machine  # type: ignore[import-not-found]  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--format-lr", type=float, default=5e-2)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--only", default=None, choices=["learned"],
                    help="rerun only the learned-format QAT run and replace its row in bench/results/kuzmin.json")
    args = ap.parse_args()

    import torch

    import lowbit
    from lowbit.algorithms.qat import QATConfig
    from lowbit.calibration.data import CalibConfig
    from lowbit.eval.run import evaluate
    from lowbit.models import resolve_model
    from lowbit.qat_run import qat

    base = resolve_model("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="lowbit-kuzmin-"))
    rows = []

    def ev(ckpt: Path) -> dict:
        r = evaluate(ckpt, base=str(base), data=str(WIKI), windows=args.windows, seq_len=512, latency=False,
                     progress=False, device=args.device, native=False)
        a = r["accuracy"]
        return {"ppl_base": a["ppl_base"], "ppl": a["ppl_quant"], "ppl_delta_pct": a["ppl_delta_pct"],
                "kl_mean": a["kl_mean"], "top1": a["top1_agreement"]}

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    path = REPO / "bench" / "results" / "kuzmin.json"
    kept: list[dict] = []
    if args.only:
        kept = [r for r in json.loads(path.read_text())["rows"] if not r.get("learn_format")]
    for scheme in () if args.only else ("w8a8-int8", "fp8-dynamic"):
        t0 = time.perf_counter()
        out = lowbit.quantize(str(base), output=work / f"{scheme}-ptq", scheme=scheme,
                              calib=CalibConfig(source=str(CALIB), num_samples=16, max_length=512, pack=True),
                              device=args.device, progress=False)
        add({"run": f"{scheme} post-training (round to nearest)", "scheme": scheme, "qat": False,
             "seconds": time.perf_counter() - t0, **ev(out.output)})
    runs = [("fp8-dynamic", True)] if args.only else [("w8a8-int8", False), ("fp8-dynamic", False), ("fp8-dynamic", True)]
    for scheme, learn in runs:
        cfg = QATConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, eval_every=max(1, args.steps // 4),
                        learn_format=learn, format_lr=args.format_lr)
        t0 = time.perf_counter()
        res = qat(str(base), output=work / f"{scheme}-qat{'-learned' if learn else ''}", scheme=scheme,
                  data=str(CALIB), seq_len=args.seq_len, config=cfg, device=args.device, progress=False)
        q = res.provenance["qat"]
        row = {"run": f"{scheme} QAT{' + learned formats' if learn else ''}", "scheme": scheme, "qat": True,
               "learn_format": learn, "format_lr": args.format_lr if learn else None, "steps": args.steps, "tokens": q["tokens"], "lr": args.lr,
               "seconds": time.perf_counter() - t0, "train_seconds": res.seconds["train"],
               "held_out_loss": q["loss_curve"]["eval_loss"], **ev(res.output)}
        if learn:
            formats = q["learned_formats"]
            row["learned_formats"] = formats
            row["weight_formats"] = dict(Counter(f["weight"] for f in formats.values()))
            row["input_formats"] = dict(Counter(f["input"] for f in formats.values() if "input" in f))
            row["layers_changed_format"] = len(q["layers_changed_format"])
            img = REPO / "docs" / "img" / "learned_formats.png"
            shutil.copy(res.output / "learned_formats.png", img)
        add(row)

    rows[:0] = kept
    result = {"date": date.today().isoformat(), "machine": machine(), "device": args.device,
              "torch": torch.__version__, "lowbit": lowbit.__version__,
              "command": "python bench/kuzmin.py " + " ".join(sys.argv[1:]),
              "training": f"{CALIB.name}, {args.batch_size} x {args.seq_len} tokens a step, distillation (KL to bf16)",
              "evaluation": f"{WIKI.name}: {args.windows} x 512 tokens, emulation", "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| run | ppl | ppl delta | KL | top-1 |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f}% | {r['kl_mean']:.4f} | {100 * r['top1']:.2f}% |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

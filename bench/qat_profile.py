"""Where a QAT training step's time goes (issue 9's speed): smollm2-135m's shape, random weights.

    PYTHONPATH=src python bench/qat_profile.py [--device cuda] [--scheme w4a16] [--batch 8 --seq-len 512]
        [--train lora] [--compile [--compile-modes regional]]

Times a distillation step (teacher forward, fake-quantized student forward and backward, AdamW)
against the same step of plain bf16 fine-tuning (no fake quantization), then prints the
profiler's top operators for one QAT step. Writes bench/results/qat_profile_{device}[_lora].json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scheme", default="w4a16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--train", default="quantized", choices=["quantized", "lora"],
                    help="what the timed QAT step trains, as train() does: every fake-quantized weight and "
                         "scale, or --train lora's scales, norms (float32 masters) and rank-16 adapters")
    ap.add_argument("--compile", action="store_true", help="also time the step compiled (QATConfig(compile=True))")
    ap.add_argument("--compile-modes", default="regional,whole",
                    help="with --compile: regional (lowbit's: one compiled decoder layer, reused) and/or whole "
                         "(torch.compile of the whole model, as lowbit did before); each times its cold start")
    args = ap.parse_args()

    from lowbit.algorithms.qat import (
        _batch_loss,
        _check_compiled_gradients,
        add_lora,
        compiled_for_training,
        distill_loss,
        fake_layers,
        norm_parameters,
        prepare,
    )
    from lowbit.models.shapes import build_random
    from lowbit.scheme import get_scheme

    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    teacher = build_random("smollm2-135m", device=dev)
    ids = torch.randint(0, 49152, (args.batch, args.seq_len), device=dev)
    plain = copy.deepcopy(teacher)
    student = copy.deepcopy(teacher)
    scheme = get_scheme(args.scheme, group_size=64 if args.scheme.startswith("w4") else None)
    prepare(student, scheme, [ids[0]])
    if args.train == "lora":  # the weights freeze, as train() freezes them
        for fq in fake_layers(student).values():
            fq.weight.requires_grad_(False)
        add_lora(student, 16)
        norm_parameters(student)

    row: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "scheme": args.scheme,
                 "batch": f"{args.batch} x {args.seq_len}", "train": args.train, "torch": torch.__version__}

    def stepper(model: torch.nn.Module, train_all: bool, compiled: str | None = None,
                stack: contextlib.ExitStack | None = None):
        if train_all:
            for p in model.parameters():
                p.requires_grad_(p.dim() == 2 and p.shape[0] != 49152)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=dev == "cuda")
        fwd, tfwd, loss_fn = model, teacher, distill_loss
        if compiled:
            assert stack is not None  # undoes the regional compilation when the timing is done
            regional = compiled == "regional"
            fwd = stack.enter_context(compiled_for_training(model, regional))
            tfwd = stack.enter_context(compiled_for_training(teacher, regional))
            loss_fn = torch.compile(distill_loss)

        checked = [not compiled]

        def step() -> float:
            loss = _batch_loss(fwd, tfwd, ids, "kd", loss_fn)  # the library's step: no KV cache in training
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not checked[0]:  # a compiled step is timed only once its gradients match eager ones
                checked[0] = True
                row["compiled_gradient_cosine"] = _check_compiled_gradients(model, teacher, ids, "kd", params)
            opt.step()
            return loss

        return step

    def timed(step) -> float:
        for _ in range(2):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return (time.perf_counter() - t0) / args.steps

    tokens = args.batch * args.seq_len
    row["bf16_finetune_step_s"] = timed(stepper(plain, True))
    qat_step = stepper(student, False)
    row["qat_step_s"] = timed(qat_step)
    row["qat_tokens_per_s"] = tokens / row["qat_step_s"]
    row["bf16_finetune_tokens_per_s"] = tokens / row["bf16_finetune_step_s"]
    for mode in args.compile_modes.split(",") if args.compile else []:
        torch._dynamo.reset()  # a cold start each (inductor's on-disk cache may still serve kernels)
        with contextlib.ExitStack() as stack:
            t0 = time.perf_counter()
            compiled_step = stepper(student, False, compiled=mode, stack=stack)
            compiled_step()
            sync()
            suffix = "" if mode == "regional" else f"_{mode}"
            row[f"compile{suffix}_s"] = time.perf_counter() - t0
            row[f"qat_compiled{suffix}_step_s"] = timed(compiled_step)
            row[f"qat_compiled{suffix}_tokens_per_s"] = tokens / row[f"qat_compiled{suffix}_step_s"]
            row[f"compiled{suffix}_gradient_cosine"] = row.pop("compiled_gradient_cosine")
        print(json.dumps(row), flush=True)
    print(json.dumps(row), flush=True)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        qat_step()
        sync()
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12), flush=True)
    print(json.dumps(row), flush=True)
    lora = "_lora" if args.train == "lora" else ""
    path = REPO / "bench" / "results" / f"qat_profile_{args.device}{lora}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()

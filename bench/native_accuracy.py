"""Native FP8 (torch._scaled_mm) against lowbit's emulation on smollm2-135m, on a GPU (issue 5).

    PYTHONPATH=src python bench/native_accuracy.py [--windows 16]

The built-in model is quantized on the GPU (static fp8 with 32 x 512 built-in calibration tokens,
and fp8-dynamic); the same quantized model then runs every Linear natively and emulated, on
windows of the built-in held-out text. Reports the max |logit difference|, KL(emulated || native),
top-1 agreement between them, and each one's KL against the bf16 original. Writes
bench/results/native_accuracy.json.
"""

from __future__ import annotations

import argparse
import copy
import json
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    from lowbit.algorithms.ptq import quantize_model
    from lowbit.calibration.data import CalibConfig, load_calibration, read_text_source, token_windows
    from lowbit.checkpoint.load import native_summary
    from lowbit.models import load_model
    from lowbit.nn import QuantLinear
    from lowbit.nn.fused import fuse_quantized, unfuse_quantized
    from lowbit.scheme import get_scheme

    base, tok, _ = load_model(None, dtype=torch.bfloat16, device="cuda")
    calib = load_calibration(CalibConfig(num_samples=32, max_length=512), tok)
    text, _ = read_text_source("builtin")  # the held-out split of the built-in text, never calibrated on
    windows = token_windows(text, tok, 512, args.windows).cuda()
    out = {"date": str(date.today()), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "python bench/native_accuracy.py", "windows": f"{args.windows} x 512", "rows": []}

    def logp(m: torch.nn.Module) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [torch.log_softmax(m(input_ids=w[None]).logits[0].float(), -1) for w in windows]

    def kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> float:
        return float(sum((a.exp() * (a - b)).sum(-1).sum() for a, b in zip(p, q, strict=True)) / windows.numel())

    ref = logp(base)
    for scheme in ("fp8", "fp8-dynamic"):
        m = copy.deepcopy(base)
        quantize_model(m, get_scheme(scheme), calib.samples, progress=False)
        summary = native_summary(m, torch.device("cuda"))
        # float32-promoted accumulation, unfused, against the default (fused, fast accumulation)
        for mod in m.modules():
            if isinstance(mod, QuantLinear):
                mod.fast_accum = False
        precise = logp(m)
        for mod in m.modules():
            if isinstance(mod, QuantLinear):
                mod.fast_accum = True
        fused = fuse_quantized(m)  # what lowbit.load(device="cuda") runs
        nat = logp(m)
        with torch.inference_mode():
            nat_logits = [m(input_ids=w[None]).logits[0].float() for w in windows]
        unfuse_quantized(m)
        for mod in m.modules():
            if isinstance(mod, QuantLinear):
                mod.native = False
        emu = logp(m)
        with torch.inference_mode():
            emu_logits = [m(input_ids=w[None]).logits[0].float() for w in windows]
        # yardstick: the same emulation in float32 against bf16 (what rounding alone moves)
        from lowbit.analysis.attribution import _float32_copy

        m32 = _float32_copy(m)
        with torch.inference_mode():
            emu32 = [torch.log_softmax(m32(input_ids=w[None]).logits[0].float(), -1) for w in windows]
        del m32
        max_diff = max(float((a - b).abs().max()) for a, b in zip(nat_logits, emu_logits, strict=True))
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(nat, emu, strict=True)) / windows.numel()
        row = {"scheme": scheme, "native": summary["message"], "fused_units": fused,
               "native_path": "fused q/k/v and gate/up, fast FP8 accumulation (lowbit.load on a GPU)",
               "max_abs_logit_diff": max_diff,
               "kl_emulated_vs_native_precise_unfused": kl(emu, precise),
               "kl_emulated_vs_native": kl(emu, nat), "top1_agreement_native_vs_emulated": agree,
               "kl_native_vs_bf16": kl(ref, nat), "kl_emulated_vs_bf16": kl(ref, emu),
               "logit_range": max(float(a.abs().max()) for a in emu_logits),
               "kl_emulated_bf16_vs_emulated_fp32": kl(emu32, emu),
               "top1_agreement_emulated_bf16_vs_fp32": sum(int((a.argmax(-1) == b.argmax(-1)).sum())
                                                          for a, b in zip(emu32, emu, strict=True)) / windows.numel()}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        del m
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "native_accuracy.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

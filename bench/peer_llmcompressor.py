"""Run llm-compressor (the peer) on the shared benchmark setup and save its checkpoint.

Runs in its own virtual environment (llm-compressor pins its own transformers / compressed-tensors),
created by bench/accuracy.py:  .peers/bin/python bench/peer_llmcompressor.py --scheme FP8 --output DIR
Calibration: the same token windows lowbit uses (64 x 512 from the start of groups_merged.txt).
Prints one JSON line with the calibration time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="local model directory (the converted smollm2-135m)")
    ap.add_argument("--scheme", required=True,
                    help="FP8 (static) or FP8_DYNAMIC (round to nearest); or ALGO:SCHEME[:GROUP] with ALGO gptq, "
                         "sq+gptq (SmoothQuant 0.8, LLMC's W8A8 example) or awq, SCHEME W8A8, W4A16, FP8, "
                         "e.g. gptq:W4A16:64")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--offset", type=int, default=0, help="skip this many windows first")
    ap.add_argument("--output", required=True, type=Path)
    args = ap.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    text = Path(args.calib).read_text(encoding="utf-8").replace("\r\n", "\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    L = args.max_length
    windows = [ids[i * L : (i + 1) * L] for i in range(args.offset, args.offset + args.num_samples)]
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * L for _ in windows]})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    recipe = make_recipe(args.scheme)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(windows), max_seq_length=L,
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.output, save_compressed=True)
    tok.save_pretrained(args.output)
    print(json.dumps({"peer": "llm-compressor", "scheme": args.scheme, "quantize_seconds": seconds}))


def make_recipe(spec: str) -> object:
    """The llm-compressor modifiers for a --scheme spec (its own documented presets and defaults)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if ":" not in spec:
        return QuantizationModifier(targets="Linear", scheme=spec, ignore=["lm_head"])
    algo, scheme, *rest = spec.split(":")
    kwargs: dict = {"targets": "Linear", "ignore": ["lm_head"]}
    if scheme == "W4A16":
        group = int(rest[0]) if rest else 128
        kwargs = {"ignore": ["lm_head"], "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group},
        }}}
    else:
        kwargs["scheme"] = scheme
    if algo == "gptq":
        return GPTQModifier(**kwargs)
    if algo == "sq+gptq":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(**kwargs)]
    if algo == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(**kwargs)]
    raise SystemExit(f"unknown algorithm {algo!r}")


if __name__ == "__main__":
    main()

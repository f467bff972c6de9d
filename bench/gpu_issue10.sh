#!/usr/bin/env bash
# Issue 10's single-GPU bar on the device machine (one call, no model download: the Llama-3-8B-shaped
# model is random and written on the machine): GPTQ W4A16 of all 32 layers (16 GB of bf16 weights)
# streamed from disk with the quantizing process capped at 10 GiB of GPU memory. Prints each row as
# it finishes; writes bench/results/streaming_gpu.json (copied to $OUT).
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=src
python bench/streaming_gpu.py --layers "${LAYERS:-32}" --samples "${SAMPLES:-16}" --seq-len 512 \
  --configs w4a16-gptq --cap-gib 10 --skip-tiny
cp bench/results/streaming_gpu.json "$OUT/"

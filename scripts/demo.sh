#!/usr/bin/env bash
# Set up, then quantize the built-in default model (smollm2-135m) to static FP8 with the
# built-in offline calibration text, and evaluate it against the original.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lowbit doctor
.venv/bin/lowbit quantize --scheme fp8 --calib builtin --num-samples 128 --max-length 512 \
    --output out/smollm2-135m-fp8 --overwrite
.venv/bin/lowbit eval out/smollm2-135m-fp8 --data builtin --windows 16 --seq-len 512 \
    --json out/smollm2-135m-fp8.eval.json

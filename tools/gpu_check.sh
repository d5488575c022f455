#!/usr/bin/env bash
# GPU checks for the device machine: the gpu-marked tests, CALM-M vs Transformer-M
# forward+backward timing, then the benchmark suite's GPU set (MFU per model and attention
# backend, bf16). Results go under $OUT (default: ./gpu_results).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

"$PY" -m calm_dist.environment | tee "$OUT/environment.txt"
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
"$PY" -m bench.core_step --calm calm_m --baseline transformer_m --seq 2048 --batch 4 \
    --json "$OUT/core_step.json" 2>&1 | tee "$OUT/core_step.txt"
bench_rc=${PIPESTATUS[0]}
"$PY" -m bench --only gpu --gpu --quick --out "$OUT/bench" 2>&1 | tee "$OUT/bench_gpu.txt"
mfu_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc core_step rc=$bench_rc mfu rc=$mfu_rc" | tee "$OUT/summary.txt"
exit $(( tests_rc != 0 || bench_rc != 0 || mfu_rc != 0 ))

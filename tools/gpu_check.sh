#!/usr/bin/env bash
# GPU checks on one CUDA machine, in one go, each phase under a time limit:
#   1. the gpu-marked tests (backends against the reference attention, KV cache, CALM-M bf16
#      forward/backward, the 3d engine's bf16 steps);
#   2. CALM-M vs Transformer-M forward+backward timing (bench.core_step);
#   3. the benchmark suite's GPU set: MFU per model and attention backend beside transformers'
#      Llama at the same backbone, and baseline generation against transformers' generate.
# Results go under $OUT (default ./gpu_results). With WHEELS=DIR, the wheels in DIR are installed
# into a scratch target first (a machine without deepspeed/megatron-core/webdataset and no network).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/calm-site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/calm-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

LOG="$OUT/gpu_check.log"  # one log: the device's tool returns at most 8 files
"$PY" -m calm_dist.environment 2>&1 | tee "$LOG"
timeout "${TESTS_S:-150}" "$PY" -m pytest -m gpu -q -p no:cacheprovider -p no:xdist \
    tests/test_backbone.py tests/test_gpu_calm.py 2>&1 | tee -a "$LOG"
tests_rc=${PIPESTATUS[0]}
timeout "${CORE_S:-90}" "$PY" -m bench.core_step --calm calm_m --baseline transformer_m --seq 2048 --batch 4 \
    --json "$OUT/core_step.json" 2>&1 | tee -a "$LOG"
bench_rc=${PIPESTATUS[0]}
timeout "${MFU_S:-300}" "$PY" -m bench --only gpu --gpu --quick --out "$OUT/bench" 2>&1 | tee -a "$LOG"
mfu_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc core_step rc=$bench_rc mfu rc=$mfu_rc" | tee -a "$LOG"
exit $(( tests_rc != 0 || bench_rc != 0 || mfu_rc != 0 ))

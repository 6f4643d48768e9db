#!/usr/bin/env bash
# Every device figure in one call, for the day a GPU (or TPU) is at hand: at most 8 minutes on one
# H100, each benchmark under its own time limit so one slow part cannot eat the others' time.
#
#   bash benchmarks/bench_device_suite.sh [OUT]       # on the device; tables in OUT (default /tmp/device_suite)
#   TINY=1 bash benchmarks/bench_device_suite.sh OUT  # CPU smoke run of the same script (tiny settings)
#
# 1. train_step: img/s, MFU and measured peak memory next to --mode=compile's prediction, for SiD2
#    IN256 UViT/2, MicroDiT-XL/2 (phase 1, 75% masked) and TerDiT-600M full precision in bf16 and
#    COAT (benchmarks/bench_train_step.py);
# 2. ternary_matmul: packed-ternary Pallas and Triton kernels against the bf16 dot, M in {1, 16, 4096};
# 3. fp8_adamw: the fused FP8 AdamW step against optax.adamw at 1B parameters;
# 4. inception: FID Inception images/s.
# The summary at the end lists each part's exit status; the suite exits 1 if any part failed.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${1:-/tmp/device_suite}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ "${TINY:-0}" = 1 ]; then
  export JAX_PLATFORMS=cpu
  TRAIN=(--cpu_smoke)
  TERNARY=(--impls pallas --m 1,16 --trials 1)
  ADAMW=(--params 65536 --leaf_cols 256 --steps 1)
  INCEPTION=(--batch 2 --iters 1 --weights random)
  LIMIT=300
else
  TRAIN=(--configs sid2_in256.py:batch=64 microdit.py:XL_2,p1_256_masked,batch=128
         terdit.py:600M_256_fp,batch=64 terdit.py:600M_256_fp,batch=64,precision=coat)
  TERNARY=(--m 1,16,4096)
  ADAMW=(--params 1073741824)
  INCEPTION=(--batch 200 --iters 5)
  LIMIT=0
fi

declare -A status
part() {  # part NAME SECONDS COMMAND...: runs with a time limit, output in OUT/NAME.txt
  local name=$1 seconds=$2
  shift 2
  [ "$LIMIT" -gt 0 ] && seconds=$LIMIT
  echo "== $name (limit ${seconds}s): $*"
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt"
  status[$name]=${PIPESTATUS[0]}
}

part train_step 270 "$PY" benchmarks/bench_train_step.py "${TRAIN[@]}"
part ternary_matmul 60 "$PY" benchmarks/bench_ternary_matmul.py "${TERNARY[@]}"
part fp8_adamw 60 "$PY" benchmarks/bench_fp8_adamw.py "${ADAMW[@]}"
part inception 45 "$PY" benchmarks/bench_inception.py "${INCEPTION[@]}"

echo "== summary ($OUT)"
failed=0
for name in train_step ternary_matmul fp8_adamw inception; do
  echo "$name: exit ${status[$name]}"
  [ "${status[$name]}" = 0 ] || failed=1
done
exit $failed

#!/usr/bin/env bash
# One GPU call for issue 12 (performance): the CUDA tests, the training benchmark (R101-FPN, batch 8,
# 800x1333: bf16 eager; bf16 + channels_last + torch.compile on both models), the inference benchmark
# (R50-FPN, batch 1 and 8: eager, prepared, static + CUDA graph, torchvision default and channels_last;
# then each side's compiled best at batch 1; bf16) and a profiler summary. Installs nothing.
#
#   OUT=/path/to/out bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   OUT=/tmp/gc DEV=cpu TINY=1 bash benchmarks/gpu_check.sh  # dry run on a CPU with tiny sizes
#
# Every step has its own time limit and the whole script a budget (BUDGET seconds, default 450): a step
# that would not fit is skipped, and a hang costs at most its step. Each step writes $OUT/<step>.txt (and
# .json for benchmarks); $OUT/steps.txt lists each step's exit code and seconds.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
DEV=${DEV:-cuda}; PY=${PYTHON:-python3}; BUDGET=${BUDGET:-450}
if [ "${TINY:-0}" = 1 ]; then
  H=96; W=128; B=2; IT=2; WU=1; REP=2; TARCH=R18-FPN; IARCH=R18-FPN; IB="1 2"; MS="--model-size 96 128"
else
  H=800; W=1333; B=8; IT=10; WU=3; REP=3; TARCH=R101-FPN; IARCH=R50-FPN; IB="1 8"; MS=""
fi
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local l; l=$(left)
  if [ "$l" -lt 30 ]; then echo "$name skipped (budget spent)" | tee -a "$OUT/steps.txt"; return; fi
  [ "$limit" -gt "$l" ] && limit=$l
  echo "== $name (limit ${limit}s, budget left ${l}s)"
  local s; s=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s" | tee -a "$OUT/steps.txt"
  grep -v -i -E "warn|^\s*$" "$OUT/$name.txt" | tail -n 30
}
bench() {  # bench NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" "$PY" -m resnet_det benchmark --device "$DEV" --size $H $W --iters $IT --warmup $WU \
    --repeats $REP --json "$OUT/$name.json" ${MS:+--memory off $MS} "$@"
}
: > "$OUT/steps.txt"
step env 60 bash -c "$PY -c 'import torch, torchvision, sys; print(sys.version); print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'; nvidia-smi || true; git log --oneline -1 || true"
if [ "$DEV" != cpu ]; then
  step cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py tests/detection/test_optimized_paths.py
fi
# Inference first: the new paths (static shapes + CUDA graph) are the least proven.
bench infer_fp32 150 --arch $IARCH --dtype fp32 --modes infer --infer-batch $IB \
  --models ours ours-prepared ours-static torchvision torchvision-cl
bench train_bf16 90 --arch $TARCH --dtype bf16 --modes train --train-batch $B --models ours torchvision
bench train_bf16_cl_compile 200 --arch $TARCH --dtype bf16 --modes train --train-batch $B --models ours torchvision \
  --channels-last --compile
bench infer_fp32_compile_b1 110 --arch $IARCH --dtype fp32 --modes infer --infer-batch 1 \
  --models ours-static torchvision-cl --compile
bench infer_bf16 70 --arch $IARCH --dtype bf16 --modes infer --infer-batch $IB \
  --models ours-prepared ours-static torchvision-cl
step profile 70 env DEV="$DEV" H=$H W=$W B=$B ARCH=$TARCH IARCH=$IARCH TINY="${TINY:-0}" "$PY" benchmarks/gpu_profile.py
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/steps.txt"
grep -h -E "^(like for like|each at its best)" "$OUT"/*.txt | tee "$OUT/summary.txt"

#!/usr/bin/env bash
# Second GPU call: training benchmarks after the sync reductions (R50/R101 bf16 eager, R101 bf16 with
# channels_last + torch.compile), fp32 inference with our prepared model, and a profiler summary.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out2}; mkdir -p "$OUT"
DEV=${DEV:-cuda}; H=${H:-800}; W=${W:-1333}; B=${B:-8}; IT=${IT:-10}
run() { local name=$1; shift; echo "== $name"; timeout ${STEP_TIMEOUT:-240} python3 tools/benchmark.py --device "$DEV" --size $H $W --train-batch $B --iters $IT --warmup 5 --json "$OUT/$name.json" "$@" 2>&1 | grep -v Warn | tee "$OUT/$name.txt"; }
run train_bf16_cl_compile --arch R101-FPN --dtype bf16 --modes train --channels-last --compile
run train_bf16 --arch R50-FPN R101-FPN --dtype bf16 --modes train
echo "== profile"; COMPILE=0 DEV=$DEV H=$H W=$W B=$B timeout ${STEP_TIMEOUT:-240} python3 benchmarks/gpu_profile.py 2>&1 | grep -v Warn > "$OUT/profile.txt"; head -45 "$OUT/profile.txt"
run infer_fp32_prepared --arch R50-FPN --dtype fp32 --modes infer --infer-batch 1 8 --prepared --models ours
echo done

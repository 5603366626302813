#!/usr/bin/env bash
# All GPU checks and benchmarks in one call (the device time is rationed): a CUDA smoke test of our
# detector (train step fp32/bf16/fp16, eval, parity of batched vs single-image inference), then
# tools/benchmark.py: training at 800x1333 batch 8 (R50-FPN, R101-FPN; bf16 eager; R101 bf16 with
# channels_last + torch.compile for both models), inference batch 1 and 8 (fp32).
# Usage: OUT=dir bash benchmarks/gpu_run.sh   (each step writes its JSON/log into $OUT as it finishes)
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
DEV=${DEV:-cuda}; H=${H:-800}; W=${W:-1333}; B=${B:-8}; IT=${IT:-10}
python3 - <<'PY' 2>&1 | tee "$OUT/smoke.txt"
import torch, time, os
from detection.models import build_faster_rcnn
dev = torch.device(os.environ.get("DEV", "cuda"))
print("torch", torch.__version__, "device", dev, torch.cuda.get_device_name(0) if dev.type == "cuda" else "")
torch.manual_seed(0)
m = build_faster_rcnn(backbone="resnet50", num_classes=5, norm="FrozenBN", min_size=(320,), max_size=480,
                      test_min_size=320, test_max_size=480).to(dev)
imgs = [torch.rand(3, 300, 400, device=dev), torch.rand(3, 280, 420, device=dev)]
tg = [{"boxes": torch.tensor([[10., 20, 200, 220], [50, 60, 90, 120]], device=dev), "labels": torch.tensor([1, 2], device=dev)},
      {"boxes": torch.zeros(0, 4, device=dev), "labels": torch.zeros(0, dtype=torch.int64, device=dev)}]
opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3)
for dt in ("fp32", "bf16", "fp16"):
    m.train()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16 if dt == "bf16" else torch.float16) if dt != "fp32" else torch.autocast("cuda", enabled=False)
    with ctx:
        losses = m(imgs, tg)
    total = sum(losses.values()); opt.zero_grad(); total.backward(); opt.step()
    print(dt, {k: round(float(v), 4) for k, v in losses.items()}, "finite", bool(torch.isfinite(total)))
m.eval()
with torch.no_grad():
    both = m(imgs); single = [m([i])[0] for i in imgs]
for a, b in zip(both, single):
    n = min(len(a["boxes"]), len(b["boxes"]))
    print("batched vs single: n", len(a["boxes"]), len(b["boxes"]), "max box diff", float((a["boxes"][:n] - b["boxes"][:n]).abs().max()) if n else 0.0)
PY
run() { local name=$1; shift; echo "== $name"; timeout ${STEP_TIMEOUT:-240} python3 tools/benchmark.py --device "$DEV" --size $H $W --train-batch $B --iters $IT --warmup 3 --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.txt"; }
run train_bf16 --arch R50-FPN R101-FPN --dtype bf16 --modes train
run infer_fp32 --arch R50-FPN R101-FPN --dtype fp32 --modes infer --infer-batch 1 8
run train_bf16_cl_compile --arch R101-FPN --dtype bf16 --modes train --channels-last --compile
run train_fp32_fp16 --arch R50-FPN --dtype fp32 fp16 --modes train
echo done

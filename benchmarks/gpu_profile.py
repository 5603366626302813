"""Where the time goes: torch.profiler summaries (GPU kernels and CPU ops) of one training step of ours
(bf16, channels_last) and of batch-1 inference through our static predictor (CUDA graph on a GPU) and
torchvision's model, the same weights and inputs as `resnet-det benchmark`.

    DEV=cuda ARCH=R101-FPN IARCH=R50-FPN H=800 W=1333 B=8 python benchmarks/gpu_profile.py
"""

from __future__ import annotations

import os

import torch

from resnet_det.studies.benchmark import build_pair, make_inputs, prepare

dev = torch.device(os.environ.get("DEV", "cuda"))
h, w, b = int(os.environ.get("H", 800)), int(os.environ.get("W", 1333)), int(os.environ.get("B", 8))
model_size = (h, w) if os.environ.get("TINY") == "1" else (800, 1333)
cuda = dev.type == "cuda"
acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"


def sync() -> None:
    if cuda:
        torch.cuda.synchronize()


def profile(title: str, fn, warmup: int = 3, steps: int = 3) -> None:
    for _ in range(warmup):
        fn()
    sync()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync()
    print(f"\n===== {title} ({steps} calls)")
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


# ----------------------------------------------------------------------------------- training (ours)
ours, _ = build_pair(os.environ.get("ARCH", "R101-FPN"), model_size=model_size, calibration=(h, w))
model = prepare(ours, device=dev, channels_last=True, compile_backbone=False).train()
images, targets = make_inputs(b, h, w, dev)
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)


def step() -> None:
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        losses = model(images, targets)
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


profile(f"train step, ours, {os.environ.get('ARCH', 'R101-FPN')} bf16 channels_last, batch {b}", step)
torch.cuda.empty_cache() if cuda else None

# ------------------------------------------------------------------------------ inference, batch 1
from detection.static import StaticPredictor  # noqa: E402

ours, tv = build_pair(os.environ.get("IARCH", "R50-FPN"), model_size=model_size, calibration=(h, w))
prepared = ours.to(dev).prepare_for_inference()
static = StaticPredictor(prepared)
tv = prepare(tv, device=dev, channels_last=True, compile_backbone=False).eval()
images, _ = make_inputs(1, h, w, dev)
with torch.inference_mode():
    profile("inference batch 1, ours-static (prepared, static shapes" + (", CUDA graph)" if cuda else ")"),
            lambda: static(images))
    profile("inference batch 1, torchvision channels_last", lambda: tv(images))
print("static predictor fallbacks:", static.fallbacks)

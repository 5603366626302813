"""Where a training step of ours goes on the GPU: torch.profiler summary (CUDA kernels and CPU ops)."""

from __future__ import annotations

import os

import torch

from resnet_det.studies.benchmark import build_ours, make_inputs, prepare

dev = torch.device(os.environ.get("DEV", "cuda"))
h, w, b = int(os.environ.get("H", 800)), int(os.environ.get("W", 1333)), int(os.environ.get("B", 8))
model = prepare(build_ours(os.environ.get("ARCH", "R101-FPN")), device=dev, channels_last=True,
                compile_backbone=os.environ.get("COMPILE", "1") == "1").train()
images, targets = make_inputs(b, h, w, dev)
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
ctx = torch.autocast(dev.type, dtype=torch.bfloat16)


def step() -> None:
    with ctx:
        losses = model(images, targets)
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


for _ in range(4):
    step()
if dev.type == "cuda":
    torch.cuda.synchronize()
acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
with torch.profiler.profile(activities=acts) as prof:
    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))

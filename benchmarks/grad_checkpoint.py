"""Peak memory and step time of a training step with and without gradient checkpointing of the backbone stages.

Each setting runs in a fresh process (so the peak resident memory is its own): build the detector (random
weights, the config's frozen stem + res2 and FrozenBN), one warm-up step, then ``--steps`` timed training
steps (forward, backward, SGD step) on the same random ``--size`` image with a few boxes. Reported: the
median step time, the peak resident set (VmHWM) and the resident set before the first step (VmRSS: weights,
optimizer, allocator), so the difference is what the step itself needed.

Usage (the command of benchmarks/grad_checkpoint_cpu_2026-12-02.json)::

    PYTHONPATH=. python benchmarks/grad_checkpoint.py --arch resnet101 --size 800 1333 --batch 1 --steps 2 \\
        --out benchmarks/grad_checkpoint_cpu_2026-12-02.json

Random weights with the last norm of every residual branch zeroed (``zero_init_residual``): with plain random
weights and identity frozen BN the activations of 33 bottleneck blocks overflow, the proposals become NaN and
torchvision's CPU RoIAlign crashes (SIGSEGV) on them. The kernels, shapes and memory are those of a real step.

On a GPU the same script reports ``torch.cuda.max_memory_allocated`` too (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _one(args: argparse.Namespace) -> dict:
    import torch

    from detection import build_faster_rcnn

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    h, w = args.size
    model = build_faster_rcnn(num_classes=80, backbone_name=args.arch, min_size=(h,), max_size=w).to(device)
    model.backbone.bottom_up.reset_parameters(zero_init_residual=True)  # finite activations (see the docstring)
    if args.checkpoint != "off":
        stages = True if args.checkpoint == "all" else tuple(args.checkpoint.split(","))
        model.backbone.bottom_up.set_grad_checkpointing(stages)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    images = [torch.rand(3, h, w, device=device) for _ in range(args.batch)]
    boxes = torch.tensor([[100.0, 120.0, 400.0, 500.0], [600.0, 200.0, 900.0, 700.0], [50, 50, 200, 180]],
                         device=device)
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 5, 9], device=device)} for _ in range(args.batch)]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(losses.values()).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: lazy initialisation, allocator growth, anchors cached
    rss_before = _proc_kib("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out = {"checkpoint": args.checkpoint, "step_s_median": statistics.median(times), "step_s": times,
           "peak_rss_mib": _proc_kib("VmHWM") / 1024, "rss_before_steps_mib": rss_before / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet101")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("MIN", "MAX"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--settings", nargs="+", default=["off", "all"],
                        help="off, all, or comma-separated stages (res3,res4)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        args.checkpoint = args.child
        print(json.dumps(_one(args)))
        return
    results = []
    for setting in args.settings:
        cmd = [sys.executable, __file__, "--child", setting, "--arch", args.arch, "--size", *map(str, args.size),
               "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    import torch

    record = {
        "command": "python " + " ".join(sys.argv),
        "arch": f"{args.arch}-FPN Faster R-CNN", "size": list(args.size), "batch": args.batch, "steps": args.steps,
        "device": args.device, "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "note": "shared 2-core machine with other jobs running: times are noisy, memory is not",
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

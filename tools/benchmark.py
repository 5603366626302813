#!/usr/bin/env python
"""Benchmark our Faster R-CNN against torchvision's (same process, same inputs).

    python tools/benchmark.py --device cpu --size 320 480 --train-batch 2 --iters 3
    python tools/benchmark.py --device cuda --arch R50-FPN R101-FPN --dtype fp32 bf16 fp16 --size 800 1333 \
        --train-batch 8 --channels-last --compile --json benchmarks/h100.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.benchmark import ARCHS, HEADER, environment, run, speedups, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["R50-FPN"], choices=sorted(ARCHS))
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--infer-batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--iters", type=int, default=15, help="timed iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone + FPN of both models")
    p.add_argument("--prepared", action="store_true",
                   help="also time our model after prepare_for_inference() (folded BN, channels_last)")
    p.add_argument("--models", nargs="+", default=["ours", "torchvision"], choices=["ours", "torchvision"])
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--json", default="benchmarks/latest.json", help="where to write the results")
    a = p.parse_args(argv)
    if a.iters < 1 or a.train_batch < 1 or any(b < 1 for b in a.infer_batch):
        p.error("--iters and batch sizes must be >= 1")
    env = environment(a.device)
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    print(HEADER)
    results = run(archs=a.arch, dtypes=a.dtype, device=a.device, height=a.size[0], width=a.size[1],
                  train_batch=a.train_batch, infer_batches=a.infer_batch, iters=a.iters, warmup=a.warmup,
                  channels_last=a.channels_last, compile_backbone=a.compile, which=a.models, modes=a.modes,
                  prepared=a.prepared)
    for line in speedups(results):
        print(line)
    print(f"wrote {write_json(results, a.json, env)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

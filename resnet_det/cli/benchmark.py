"""``resnet-det benchmark``: speed and memory of our Faster R-CNN against torchvision's, same process,
same inputs.

    resnet-det benchmark --device cpu --size 320 480 --train-batch 2 --iters 3
    resnet-det benchmark --device cuda --arch R50-FPN R101-FPN --dtype fp32 bf16 fp16 --size 800 1333 \\
        --train-batch 8 --channels-last --compile --json benchmarks/h100.json

Prints one row per (model, arch, mode, dtype, batch), the speed-ups over torchvision, and writes the
rows with the environment (GPU, versions) to ``--json``. The models have random weights and lr 0.
"""

from __future__ import annotations

import argparse

from ._util import CommandError

HELP = "training / inference speed and memory, ours vs torchvision, same process and inputs"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``benchmark``."""
    from resnet_det.studies.benchmark import ARCHS

    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["R50-FPN"], choices=sorted(ARCHS),
                   help="detector architectures to measure (default R50-FPN)")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                   help="precision: fp32, or bf16 / fp16 autocast (default fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"),
                   help="input image height and width in pixels (default 800 1333)")
    p.add_argument("--train-batch", type=int, default=8, help="images per training step (default 8)")
    p.add_argument("--infer-batch", nargs="+", type=int, default=[1, 8],
                   help="inference batch sizes, each measured (default 1 8)")
    p.add_argument("--iters", type=int, default=15, help="timed iterations, the median is reported (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before timing (default 3)")
    p.add_argument("--channels-last", action="store_true", help="run both models in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone + FPN of both models")
    p.add_argument("--prepared", action="store_true",
                   help="also time our model after prepare_for_inference() (folded BN, channels_last)")
    p.add_argument("--models", nargs="+", default=["ours", "torchvision"], choices=["ours", "torchvision"],
                   help="which models to measure (default both)")
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"],
                   help="training steps and/or inference calls (default both)")
    p.add_argument("--json", default="benchmarks/latest.json",
                   help="where to write the results (default benchmarks/latest.json)")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Measures and prints; returns 0."""
    if args.iters < 1 or args.warmup < 0 or args.train_batch < 1 or any(b < 1 for b in args.infer_batch):
        parser.error("--iters and the batch sizes must be >= 1, --warmup >= 0")
    import torch

    from resnet_det.studies.benchmark import HEADER, environment, speedups, write_json
    from resnet_det.studies.benchmark import run as run_benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise CommandError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device!r}: this machine has no CUDA device; use --device cpu")
    env = environment(device)
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    print(HEADER)
    results = run_benchmark(archs=args.arch, dtypes=args.dtype, device=device, height=args.size[0],
                            width=args.size[1], train_batch=args.train_batch, infer_batches=args.infer_batch,
                            iters=args.iters, warmup=args.warmup, channels_last=args.channels_last,
                            compile_backbone=args.compile, which=args.models, modes=args.modes,
                            prepared=args.prepared)
    for line in speedups(results):
        print(line)
    print(f"wrote {write_json(results, args.json, env)}")
    return 0

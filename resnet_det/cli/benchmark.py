"""``resnet-det benchmark``: speed and memory of our Faster R-CNN against torchvision's, same process,
same weights, same inputs, timed calls interleaved between the models over several repeats.

    resnet-det benchmark --device cpu --size 320 480 --train-batch 2 --iters 3
    resnet-det benchmark --device cpu --size 320 480 --modes infer --infer-batch 1 4 \\
        --models ours ours-prepared ours-onnx torchvision torchvision-cl --json benchmarks/cpu.json
    resnet-det benchmark --device cuda --arch R101-FPN --dtype bf16 --size 800 1333 --train-batch 8 \\
        --modes train --channels-last --compile --json benchmarks/h100.json

Prints one row per (model, arch, mode, dtype, batch): the median over ``--repeats`` of each repeat's
median, the repeats' range, peak memory (a process per model on a CPU) and the detections per image;
then the ours / torchvision ratios ("like for like": equal settings; "each at its best": the fastest
row of each side, labelled so). ``--json`` gets the rows, the ratios, the settings, the command, the
date, versions, device, threads and the speed-relevant environment variables. The models have
torchvision's random initialisation (shared by both) and train at lr 0.
"""

from __future__ import annotations

import argparse

from ._util import CommandError

HELP = "training / inference speed and memory, ours vs torchvision, same process and inputs"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``benchmark``."""
    from resnet_det.studies.benchmark import ARCHS, MEMORY_METHODS, VARIANTS

    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["R50-FPN"], choices=sorted(ARCHS),
                   help="detector architectures to measure (default R50-FPN)")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                   help="precision: fp32, or bf16 / fp16 autocast (default fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"),
                   help="input image height and width in pixels (default 800 1333)")
    p.add_argument("--model-size", nargs=2, type=int, default=[800, 1333], metavar=("MIN", "MAX"),
                   help="both detectors' resize rule: shorter side MIN, longer side at most MAX (default 800 1333, "
                        "torchvision's)")
    p.add_argument("--train-batch", type=int, default=8, help="images per training step (default 8)")
    p.add_argument("--infer-batch", nargs="+", type=int, default=[1, 8],
                   help="inference batch sizes, each measured (default 1 8)")
    p.add_argument("--iters", type=int, default=15, help="timed calls per model and repeat (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model before timing (default 3)")
    p.add_argument("--repeats", type=int, default=3,
                   help="repeats, interleaved between the models; rows report the median and range (default 3)")
    p.add_argument("--channels-last", action="store_true", help="run ours and torchvision in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone + FPN of every model")
    p.add_argument("--prepared", action="store_true",
                   help="also time ours-prepared (prepare_for_inference(): folded BN, channels_last)")
    p.add_argument("--models", nargs="+", default=["ours", "torchvision"], choices=list(VARIANTS),
                   help="variants to measure (default ours torchvision); torchvision-cl is torchvision in "
                        "channels_last; ours-prepared and ours-static (static shapes, no host syncs, CUDA graphs "
                        "on a GPU) are inference only; ours-onnx is ours exported to ONNX and run by ONNX Runtime "
                        "(CPU, fp32, inference only)")
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"],
                   help="training steps and/or inference calls (default both)")
    p.add_argument("--memory", default="auto", choices=list(MEMORY_METHODS),
                   help="peak memory: auto (CUDA in process, CPU in a process per model), subprocess, inprocess "
                        "(CUDA), off (default auto)")
    p.add_argument("--json", default="benchmarks/latest.json",
                   help="where to write the results (default benchmarks/latest.json)")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Measures and prints; returns 0."""
    if args.iters < 1 or args.warmup < 1 or args.repeats < 1 or args.train_batch < 1 or any(
            b < 1 for b in [*args.infer_batch, *args.model_size]):
        parser.error("--iters, --warmup, --repeats, the batch sizes and --model-size must be >= 1")
    import torch

    from resnet_det.studies.benchmark import HEADER, config_from_settings, environment, speedups, write_json
    from resnet_det.studies.benchmark import run as run_benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise CommandError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device!r}: this machine has no CUDA device; use --device cpu")
    settings = dict(archs=args.arch, dtypes=args.dtype, device=device, height=args.size[0], width=args.size[1],
                    train_batch=args.train_batch, infer_batches=args.infer_batch, iters=args.iters,
                    warmup=args.warmup, repeats=args.repeats, channels_last=args.channels_last,
                    compile_backbone=args.compile, which=args.models, modes=args.modes, prepared=args.prepared,
                    memory=args.memory, model_size=tuple(args.model_size))
    try:
        cfg = config_from_settings(**settings)
    except ValueError as e:
        raise CommandError(str(e)) from None
    env = environment(device)
    print(f"{env['command']}\n" + ", ".join(f"{k} {env[k]}" for k in ("date", "torch", "torchvision", "device",
                                                                       "torch_threads") if k in env)
          + f", {env.get('gpu', env['cpu'])}, env {env['env']}")
    print(f"warm-up {cfg.warmup}, {cfg.iters} timed calls x {cfg.repeats} repeats (interleaved), memory: "
          f"{cfg.memory_method}")
    print(HEADER)
    failures: list[dict[str, str]] = []
    results = run_benchmark(**settings, failures=failures)
    for line in speedups(results):
        print(line)
    print(f"wrote {write_json(results, args.json, env, cfg, failures)}")
    if failures:
        print(f"{len(failures)} variant(s) failed: " + "; ".join(f"{f['model']} {f['mode']} batch {f['batch']}"
                                                            for f in failures))
    return 0

"""``resnet-det degradation-study``: the ResNet paper's degradation study on CIFAR-10 (section 4.2,
Fig. 6): plain nets get worse with depth, ResNets get better.

    resnet-det degradation-study --data /path/to/cifar10                  # plain/resnet-20 and -56, 64k its
    resnet-det degradation-study --data /path/to/cifar10 --depths 20 32 44 56 110 --amp bf16
    resnet-det degradation-study --data synthetic --iterations 200       # smoke run, no download

`--data` holds cifar-10-batches-bin/ or cifar-10-batches-py/ (from https://www.cs.toronto.edu/~kriz/cifar.html;
nothing is downloaded). Writes <output-dir>/{study.md,study.json,study.png} and one folder per net
(metrics.jsonl, result.json); rerunning the command resumes (finished nets are skipped, the current one
continues from its last checkpoint).
"""

from __future__ import annotations

import argparse

from ._util import CommandError, console_logging, one_line

HELP = "the paper's CIFAR-10 plain vs ResNet degradation study (Fig. 6, Table 6)"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``degradation-study``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 folder, or 'synthetic'")
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56], help="net depths, 6n+2 (default 20 56)")
    p.add_argument("--kinds", nargs="+", default=["plain", "resnet"], choices=["plain", "resnet"],
                   help="plain nets and/or ResNets (default both)")
    p.add_argument("--iterations", type=int, default=64_000, help="milestones scale with it (50%%, 75%%)")
    p.add_argument("--batch-size", type=int, default=128, help="images per iteration (default 128)")
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate (default 0.1)")
    p.add_argument("--eval-period", type=int, default=2000, help="iterations between test evaluations")
    p.add_argument("--checkpoint-period", type=int, default=2000, help="iterations between checkpoints")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="mixed precision (default off)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--output-dir", default="output/degradation_study",
                   help="study files and one folder per net (default output/degradation_study)")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs (or resumes) the study; returns 0, or raises :class:`CommandError` for bad input."""
    from resnet_det.studies.degradation import StudyConfig, run_degradation_study

    try:
        cfg = StudyConfig(depths=tuple(args.depths), kinds=tuple(args.kinds), iterations=args.iterations,
                          batch_size=args.batch_size, lr=args.lr, eval_period=min(args.eval_period, args.iterations),
                          checkpoint_period=args.checkpoint_period, amp=args.amp, channels_last=args.channels_last,
                          seed=args.seed)
        with console_logging():
            run_degradation_study(args.data, cfg, args.output_dir, device=args.device)
    except (ValueError, FileNotFoundError) as e:
        raise CommandError(one_line(e)) from None
    return 0

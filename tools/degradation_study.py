#!/usr/bin/env python
"""The ResNet paper's degradation study on CIFAR-10 (section 4.2, Fig. 6): plain nets get worse with
depth, ResNets get better.

    python tools/degradation_study.py --data /path/to/cifar10                  # plain/resnet-20 and -56, 64k its
    python tools/degradation_study.py --data /path/to/cifar10 --depths 20 32 44 56 110 --amp bf16
    python tools/degradation_study.py --data synthetic --iterations 200       # smoke run, no download

`--data` holds cifar-10-batches-bin/ or cifar-10-batches-py/ (from https://www.cs.toronto.edu/~kriz/cifar.html;
nothing is downloaded). Writes <output-dir>/{study.md,study.json,study.png} and one folder per net
(metrics.jsonl, result.json); rerunning the command resumes (finished nets are skipped, the current one
continues from its last checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbone.cifar import StudyConfig, run_degradation_study


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 folder, or 'synthetic'")
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    p.add_argument("--kinds", nargs="+", default=["plain", "resnet"], choices=["plain", "resnet"])
    p.add_argument("--iterations", type=int, default=64_000, help="milestones scale with it (50%%, 75%%)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--eval-period", type=int, default=2000)
    p.add_argument("--checkpoint-period", type=int, default=2000)
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="output/degradation_study")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = StudyConfig(depths=tuple(a.depths), kinds=tuple(a.kinds), iterations=a.iterations,
                          batch_size=a.batch_size, lr=a.lr, eval_period=min(a.eval_period, a.iterations),
                          checkpoint_period=a.checkpoint_period, amp=a.amp, channels_last=a.channels_last,
                          seed=a.seed)
        run_degradation_study(a.data, cfg, a.output_dir, device=a.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

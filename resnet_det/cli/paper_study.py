"""``resnet-det paper-study``: the ResNet paper's VGG-16 -> ResNet-101 swap in Faster R-CNN on COCO
(Table 8).

    resnet-det paper-study data.root=/path/to/coco
    torchrun --nproc_per_node 8 -m resnet_det paper-study data.root=/path/to/coco

Trains the shipped configs paper/faster_rcnn_VGG16_C4 and paper/faster_rcnn_R_101_C4 (they differ in
the backbone line only), evaluates both, and writes study.md / study.json / study.png beside the
paper's figures (mAP@[.5:.95] 21.2 -> 27.2).
"""

from __future__ import annotations

import argparse

from ._util import CommandError, config_help, console_logging, one_line

HELP = "the paper's VGG-16 vs ResNet-101 Faster R-CNN study on COCO (Table 8)"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``paper-study``."""
    from resnet_det.studies.paper import CONFIGS

    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides applied to both configs, e.g. data.root=/path/to/coco")
    p.add_argument("--configs", nargs=2, default=list(CONFIGS), metavar=("FIRST", "SECOND"),
                   help=config_help("the two configs to compare") + f" (default {' '.join(CONFIGS)})")
    p.add_argument("--output-dir", default="output/paper_study",
                   help="one folder per config inside, and the study files (default output/paper_study)")
    p.add_argument("--resume", action="store_true", help="continue each run from its last complete checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs the study; returns 0, or raises :class:`CommandError` for a bad config, path or data."""
    from backbone.weights import WeightsError
    from resnet_det.data.coco import DatasetError
    from resnet_det.studies.paper import run_study

    try:
        with console_logging():
            run_study(args.overrides, configs=args.configs, output_dir=args.output_dir, resume=args.resume,
                      progress=not args.no_progress)
    except (FileNotFoundError, ValueError, TypeError, DatasetError, WeightsError) as e:
        raise CommandError(one_line(e)) from None
    return 0

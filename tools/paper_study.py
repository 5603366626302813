#!/usr/bin/env python
"""Reproduce the ResNet paper's VGG-16 -> ResNet-101 swap in Faster R-CNN on COCO (Table 8).

    python tools/paper_study.py data.root=/path/to/coco
    torchrun --nproc_per_node 8 tools/paper_study.py data.root=/path/to/coco

Trains configs/paper/faster_rcnn_VGG16_C4.yaml and faster_rcnn_R_101_C4.yaml (they differ in the
backbone line only), evaluates both, and writes study.md / study.json / study.png beside the paper's
figures (mAP@[.5:.95] 21.2 -> 27.2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.engine.study import CONFIGS, run_study


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to both configs")
    p.add_argument("--configs", nargs=2, default=list(CONFIGS), help="the two configs to compare")
    p.add_argument("--output-dir", default="output/paper_study")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_study(a.overrides, configs=a.configs, output_dir=a.output_dir, resume=a.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())

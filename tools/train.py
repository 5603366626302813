#!/usr/bin/env python
"""Train and evaluate a detector from a YAML config.

    python tools/train.py configs/shapes/faster_rcnn_R_50_FPN.yaml [key.sub=value ...] [--resume]
    torchrun --nproc_per_node 8 tools/train.py configs/coco/faster_rcnn_R_50_FPN_1x.yaml data.root=/data/coco
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import segmentation  # noqa: F401  (registers the instance / semantic / panoptic tasks)
from detection.config import load_config
from detection.engine.launch import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. solver.lr=0.01 train.amp=bf16")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from backbone.weights import WeightsError
    from detection.data.coco import DatasetError

    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (FileNotFoundError, DatasetError, WeightsError) as e:  # bad paths, data or weights: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    ev = result.get("eval") or {}  # flattened metric names, e.g. "bbox/AP", "segm/AP", "sem_seg/mIoU"
    shown = [f"{k} {v:.3f}" for k, v in ev.items()
             if k in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50", "sem_seg/mIoU") and isinstance(v, float | int)]
    if shown:
        print(f"final: {', '.join(shown)} ({result.get('iteration')} iterations, "
              f"{result.get('train_minutes', 0):.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

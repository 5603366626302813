#!/usr/bin/env python
"""Generate the synthetic shapes dataset (COCO format) into OUT_DIR.

Example::

    python tools/make_shapes.py data/shapes --num-train 1000 --num-val 200 --image-size 256 --seed 0
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from detection.data.shapes import DEFAULT_CLASSES, SHAPE_CLASSES, make_shapes


def main(argv: Sequence[str] | None = None) -> int:
    """Parses arguments, generates the dataset, prints its folder; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist unless --overwrite)")
    ap.add_argument("--num-train", type=int, default=1000, help="training images (default 1000)")
    ap.add_argument("--num-val", type=int, default=200, help="validation images (default 200)")
    ap.add_argument("--image-size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--max-image-size", type=int, default=None,
                    help="draw each side in [image-size, max-image-size] instead of a fixed size")
    ap.add_argument("--min-shapes", type=int, default=1, help="fewest shapes per image (default 1)")
    ap.add_argument("--max-shapes", type=int, default=4, help="most shapes per image (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), choices=SHAPE_CLASSES,
                    help=f"shape classes, category ids 1..K in this order (default {' '.join(DEFAULT_CLASSES)})")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        root = make_shapes(
            args.out_dir,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            max_image_size=args.max_image_size,
            min_shapes=args.min_shapes,
            max_shapes=args.max_shapes,
            seed=args.seed,
            classes=args.classes,
            overwrite=args.overwrite,
            progress=True,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{root} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

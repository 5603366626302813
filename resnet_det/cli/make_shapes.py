"""``resnet-det make-shapes``: generate the synthetic shapes dataset (COCO format) into OUT_DIR.

    resnet-det make-shapes data/shapes --num-train 1000 --num-val 200 --image-size 256 --seed 0

Writes COCO JSON, JPEG images, instance masks and semantic PNGs. Training needs no such step (it
generates the dataset into a cache on first use); this writes one of the size and classes you choose
into a folder you pick.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ._util import CommandError, console_logging, one_line

HELP = "write the synthetic shapes dataset (COCO JSON, JPEGs, instance and semantic masks)"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``make-shapes``."""
    from resnet_det.data.formats import format_names
    from resnet_det.data.shapes import DEFAULT_CLASSES, SHAPE_CLASSES

    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--format", default="coco", choices=list(format_names()),
                    help="the layout to write (resnet_det.data.formats): coco (default; with instance and semantic "
                    "masks), yolo (data.yaml, images/, labels/), voc (JPEGImages/, Annotations/, ImageSets/Main/); "
                    "train on it with data.format=FORMAT data.root=OUT_DIR")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return ap


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Generates the dataset and prints its folder; returns 0, or raises :class:`CommandError`."""
    from resnet_det.data.shapes import make_shapes

    start = time.perf_counter()
    params = dict(num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
                  max_image_size=args.max_image_size, min_shapes=args.min_shapes, max_shapes=args.max_shapes,
                  seed=args.seed, classes=args.classes, overwrite=args.overwrite, progress=True)
    try:
        with console_logging():
            if args.format == "coco":
                root = make_shapes(args.out_dir, **params)
            else:
                root = _make_in_format(args.out_dir, args.format, params)
    except ValueError as e:  # OutputExistsError is a ValueError too
        raise CommandError(one_line(e)) from None
    print(f"{root} ({time.perf_counter() - start:.1f} s)")
    return 0


def _make_in_format(out_dir: str, fmt: str, params: dict) -> Path:
    """The shapes written as COCO into a scratch folder beside ``out_dir``, then rewritten in ``fmt``."""
    import shutil
    import tempfile

    from resnet_det.data.formats import Source, convert
    from resnet_det.data.shapes import OutputExistsError, make_shapes

    out = Path(out_dir)
    if out.exists():
        if not params["overwrite"]:
            raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-coco-") as scratch:
        coco_root = make_shapes(Path(scratch) / "shapes", **{**params, "overwrite": False})
        source = Source(root=str(coco_root), train_images="train", train_annotations="annotations/instances_train.json",
                        val_images="val", val_annotations="annotations/instances_val.json")
        # The images are hard-linked (or copied): they stay when the scratch folder goes away.
        convert(source, "coco", fmt, out)
    return out

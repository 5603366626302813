"""``resnet-det convert``: rewrite a dataset in another layout (YOLO or Pascal VOC to COCO, and back).

    resnet-det convert --from yolo --root data/my_yolo --to coco --output data/my_coco
    resnet-det convert --from voc --root VOCdevkit/VOC2007 --to coco --output data/voc_coco --splits train val

The source is read with its format's validation (what was skipped or repaired is reported, as in training);
the output is a folder in the destination's layout, images hard-linked where the filesystem allows. A COCO
output is ``OUTPUT/{train,val}2017/`` + ``OUTPUT/annotations/instances_{train,val}2017.json``: train on it
with ``data.root=OUTPUT`` (``data.format`` coco, the default).
"""

from __future__ import annotations

import argparse

from ._util import CommandError, console_logging, one_line

HELP = "convert a dataset between layouts (yolo, voc, coco): e.g. --from yolo --to coco"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``convert``."""
    from resnet_det.data.formats import format_names

    names = list(format_names())
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", required=True, choices=names, help="the layout of --root")
    ap.add_argument("--to", dest="dst", default="coco", choices=names, help="the layout to write (default coco)")
    ap.add_argument("--root", required=True, help="the source dataset folder (YOLO: the folder of data.yaml, or the "
                    "file; VOC: the folder with Annotations/, JPEGImages/, ImageSets/Main/)")
    ap.add_argument("--output", required=True, help="the output folder (must not exist, or be empty)")
    ap.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"],
                    help="the splits to convert (default train val)")
    return ap


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Converts and prints the output folder; returns 0, or raises :class:`CommandError`."""
    from pathlib import Path

    from resnet_det.data.formats import Source, convert

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CommandError(f"--output {str(out)!r} exists and is not an empty folder; choose a new folder")
    try:
        with console_logging():
            convert(Source(root=args.root), args.src, args.dst, out, args.splits)
    except (FileNotFoundError, ValueError) as e:  # DatasetError is a ValueError
        raise CommandError(one_line(e)) from None
    print(out)
    return 0

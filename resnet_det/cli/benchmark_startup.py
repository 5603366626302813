"""``resnet-det benchmark-startup``: building the COCO dataset at train2017 scale, ours against pycocotools.

    resnet-det benchmark-startup                                 # 118,287 images, 860,001 instances
    resnet-det benchmark-startup --images 5000 --instances 36000 --repeats 3 --out benchmarks/startup_small

Generates a synthetic train2017-sized instances file (deterministic; ~250 MiB at full size), then measures,
each in a fresh process: pycocotools' ``COCO()``, our ``CocoDetection`` without the cache, while writing the
cache, and from the cache (time and peak RSS). Prints a table and writes the JSON record (command, versions,
machine, date, every run) into ``--out``. Run it on a quiet machine: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import datetime

from ._util import CommandError

HELP = "COCO dataset start-up at train2017 scale: time and peak RSS, ours (with/without cache) vs pycocotools"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``benchmark-startup``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=118287, help="images in the generated file (default 118287)")
    p.add_argument("--instances", type=int, default=860001,
                   help="annotations in the generated file (default 860001)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--repeats", type=int, default=1, help="measurements per mode, interleaved; medians reported")
    p.add_argument("--ann-file", default=None, help="measure this COCO file instead of generating one")
    p.add_argument("--work-dir", default=None,
                   help="keep the generated file and the cache here (default: a temporary folder)")
    p.add_argument("--out", default=None,
                   help="folder of the JSON record (default benchmarks/startup_<date>)")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Measures, prints the table, writes the record; returns 0."""
    if args.images < 1 or args.instances < 1 or args.repeats < 1:
        parser.error("--images, --instances and --repeats must be >= 1")
    from pathlib import Path

    from resnet_det.studies.startup import format_table, write_record
    from resnet_det.studies.startup import run as run_startup

    if args.ann_file is not None and not Path(args.ann_file).is_file():
        raise CommandError(f"--ann-file {args.ann_file!r} is not a file; pass a COCO instances JSON")
    out = args.out or f"benchmarks/startup_{datetime.date.today().isoformat()}"
    try:
        record = run_startup(images=args.images, instances=args.instances, seed=args.seed, repeats=args.repeats,
                             ann_file=args.ann_file, work_dir=args.work_dir, progress=print)
    except RuntimeError as e:
        raise CommandError(str(e)) from None
    print(format_table(record))
    command = ["resnet-det", "benchmark-startup", "--images", str(args.images), "--instances", str(args.instances),
               "--seed", str(args.seed), "--repeats", str(args.repeats), "--out", out]
    if args.ann_file is not None:
        command[2:6] = ["--ann-file", args.ann_file]
    print(f"wrote {write_record(record, out, command)}")
    return 0

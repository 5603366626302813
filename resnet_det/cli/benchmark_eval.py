"""``resnet-det benchmark-eval``: COCO evaluation at val2017 scale, ours against pycocotools and faster-coco-eval.

    resnet-det benchmark-eval                     # 5,000 images, 36,781 instances, 500,000 detections, bbox + segm
    resnet-det benchmark-eval --images 50 --instances 300 --per-image 20 --repeats 1 --out /tmp/bench

Generates a seeded val2017-sized set (an instances file; bbox results and RLE-mask results, 100 detections per
image, half near a ground-truth box), then measures, each in a fresh process, interleaved, ``--repeats`` times:
the whole ``resnet-det eval --results R --annotations A --output-dir D`` command, pycocotools' ``COCOeval`` and
faster-coco-eval's ``COCOeval_faster`` (their READMEs' calls): wall time (start-up included) and peak RSS
(``ru_maxrss`` of the child), medians reported with the AP each gave. ``--dist-ranks 1 2 4`` adds a distributed
evaluation of the bbox predictions (gloo, CPU) with rank 0's peak RSS per world size. Writes the record (command,
versions, machine, load average before / after, date, every run) as JSON and a text table into ``--out``. The
figures are wall-clock times: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime

from ._util import CommandError

HELP = "COCO evaluation at val2017 scale: time and peak RSS, ours vs pycocotools vs faster-coco-eval"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``benchmark-eval``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000, help="images of the generated set (default 5000)")
    p.add_argument("--instances", type=int, default=36781, help="ground-truth instances (default 36781)")
    p.add_argument("--per-image", type=int, default=100, help="detections per image (default 100)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per mode, interleaved; medians reported")
    p.add_argument("--iou-types", nargs="+", choices=("bbox", "segm"), default=["bbox", "segm"],
                   help="which results files to generate and evaluate (default: both)")
    p.add_argument("--modes", nargs="+", choices=("ours", "pycocotools", "faster-coco-eval"),
                   default=["ours", "pycocotools", "faster-coco-eval"],
                   help="what to measure (default: all three)")
    p.add_argument("--dist-ranks", nargs="*", type=int, default=[],
                   help="world sizes of a distributed bbox evaluation (gloo) to measure, e.g. 1 2 4 (default none)")
    p.add_argument("--dist-gather", nargs="+", choices=("shards", "all_gather_object"), default=["shards"],
                   help="how ranks hand their results to rank 0: shards (ours) and/or all_gather_object (former)")
    p.add_argument("--work-dir", default=None, help="keep the generated files here (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to each child process")
    p.add_argument("--out", default=None, help="folder of the record (default benchmarks/eval_<date>)")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Measures, prints the table, writes the record; returns 0."""
    if min(args.images, args.instances, args.per_image, args.repeats) < 1 or any(w < 1 for w in args.dist_ranks):
        parser.error("--images, --instances, --per-image, --repeats and --dist-ranks must be >= 1")
    from resnet_det.studies.eval_bench import format_table, write_record
    from resnet_det.studies.eval_bench import run as run_bench

    out = args.out or f"benchmarks/eval_{datetime.date.today().isoformat()}"
    command = _command(args, out)
    try:
        record = run_bench(images=args.images, instances=args.instances, per_image=args.per_image, seed=args.seed,
                           repeats=args.repeats, iou_types=tuple(args.iou_types), modes=tuple(args.modes),
                           dist_ranks=tuple(args.dist_ranks), dist_gathers=tuple(args.dist_gather),
                           work_dir=args.work_dir, timeout=args.timeout, progress=lambda line: print(line, flush=True),
                           partial=lambda rec: write_record(rec, out, command))
    except RuntimeError as e:
        raise CommandError(str(e)) from None
    print(format_table(record))
    paths = write_record(record, out, command)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _command(args: argparse.Namespace, out: str) -> list[str]:
    """The command line that reproduces this run (the record's first line)."""
    command = ["resnet-det", "benchmark-eval", "--images", str(args.images), "--instances", str(args.instances),
               "--per-image", str(args.per_image), "--seed", str(args.seed), "--repeats", str(args.repeats),
               "--iou-types", *args.iou_types, "--modes", *args.modes]
    if args.dist_ranks:
        command += ["--dist-ranks", *map(str, args.dist_ranks), "--dist-gather", *args.dist_gather]
    return [*command, "--out", out]

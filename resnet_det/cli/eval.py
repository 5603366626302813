"""``resnet-det eval``: COCO evaluation through pycocotools, of a checkpoint or of a results file.

Checkpoint mode (build the config's model, load the weights, run it on the config's val split)::

    resnet-det eval CONFIG --checkpoint PATH [key=value ...] [--output-dir DIR]

prints the COCO tables (bbox, and segm for Mask R-CNN) and/or the mean IoU, and writes metrics and
plots into ``train.output_dir``/eval (``--output-dir`` sets ``train.output_dir``). The checkpoint is
this project's (``.safetensors``/``.pth``) or a torchvision detection checkpoint.

Results mode (a COCO results JSON against an instances JSON)::

    resnet-det eval --results results.json --annotations instances_val2017.json \\
        [--iou-types bbox segm] [--output-dir DIR]

prints pycocotools' 12-line table per iou type and the per-category AP table, and with
``--output-dir`` writes ``metrics.json`` and ``pr_curve_<iou_type>.png``. Metrics are fractions.

Exit codes: 0 success; 2 bad input (missing/invalid file, empty results, ids not in the
annotations, bad arguments); 3 an output file could not be written (a full disk); with a one-line
message on stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import _library
from ._util import CommandError, RunFailedError, add_config_arguments, load_config_arg, one_line, print_config

HELP = "COCO AP / mIoU of a checkpoint on the val split, or of a COCO results JSON"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of both modes."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, optional=True)
    parser.add_argument("--checkpoint", help="checkpoint mode: the weights to evaluate")
    parser.add_argument("--no-progress", action="store_true", help="checkpoint mode: no progress bar")
    parser.add_argument("--results", help="results mode: a COCO results JSON (list of detections)")
    parser.add_argument("--annotations", help="results mode: the ground-truth COCO instances JSON")
    parser.add_argument(
        "--iou-types", nargs="+", choices=("bbox", "segm"), default=None,
        help="results mode: iou types to evaluate (default: inferred from the results: bbox if they have "
        "'bbox', segm if they have 'segmentation')",
    )  # fmt: skip
    parser.add_argument("--output-dir", help="write metrics.json and the plots here (checkpoint mode: "
                        "sets train.output_dir, the files go to its eval/ folder)")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs the mode the arguments choose; returns the exit code."""
    if args.results is not None or args.annotations is not None:
        if args.results is None or args.annotations is None:
            parser.error("results mode needs both --results and --annotations")
        if args.config is not None or args.checkpoint is not None or args.overrides or args.print_config:
            parser.error("--results/--annotations cannot be combined with CONFIG/--checkpoint/--print-config")
        return _results(args)
    if args.config is None:
        parser.error("give --results and --annotations (results mode) or CONFIG --checkpoint PATH")
    if args.print_config:
        print_config(load_config_arg(args.config, _overrides(args)))
        return 0
    if args.checkpoint is None:
        parser.error("checkpoint mode needs --checkpoint PATH")
    return _checkpoint(args)


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *([f"train.output_dir={args.output_dir}"] if args.output_dir else [])]


def _results(args: argparse.Namespace) -> int:
    from detection.evaluation import evaluate_results_json
    from resnet_det.common.io import OutputWriteError

    try:
        evaluate_results_json(args.results, args.annotations, iou_types=args.iou_types,
                              output_dir=args.output_dir)
    except BrokenPipeError:
        raise
    except OutputWriteError as e:  # metrics.json / a plot on a full disk: the run, not the input
        raise RunFailedError(one_line(e)) from None
    except (OSError, ValueError) as e:
        raise CommandError(one_line(e)) from None
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    if not Path(args.checkpoint).is_file():
        raise CommandError(f"--checkpoint {args.checkpoint!r} does not exist")
    cfg = load_config_arg(args.config, _overrides(args))
    from backbone.weights import WeightsError
    from detection.data.coco import DatasetError
    from resnet_det.common.io import OutputWriteError

    try:
        _library.evaluate_checkpoint(cfg, args.checkpoint, progress=not args.no_progress)
    except OutputWriteError as e:  # an evaluation file on a full disk: the run, not the input
        raise RunFailedError(one_line(e)) from None
    except (WeightsError, DatasetError, FileNotFoundError) as e:  # the checkpoint or the data: one line
        raise CommandError(one_line(e)) from None
    return 0

"""``resnet-det analyze``: why the AP is what it is, from a COCO results JSON and the instances JSON.

    resnet-det analyze --results results.json --annotations instances_val2017.json --output-dir DIR \\
        [--iou-type bbox|segm] [--calibration-bins 10] [--top-images 20] [--no-progress]

On COCO's own matching (pycocotools' greedy per-image, per-category matching, crowds ignored; the base
AP50 is pycocotools' AP50): TIDE's error breakdown (classification, localisation, both, duplicate,
background, missed; false-positive and false-negative dAP50), calibration (D-ECE over confidence bins,
a detection correct when it is a TP at IoU 0.5), per-category AP worst first, precision-recall by object
size, a category confusion matrix at IoU 0.5 and the images that lose the most AP50.

Prints TIDE's table and the D-ECE; writes into DIR ``report.html`` (one self-contained page, plots
inline, opens offline), the PNG plots and ``metrics.json`` (every number, as fractions).

Exit codes: 0 success; 2 bad input (a missing or invalid file, results that are not a list, ids not in
the annotations, bad arguments), with a one-line message on stderr.
"""

from __future__ import annotations

import argparse

from ._util import CommandError, console_logging, one_line

HELP = "TIDE error breakdown, calibration (D-ECE), per-category / per-size / confusion analysis of COCO results"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``analyze``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="a COCO results JSON (list of detections)")
    parser.add_argument("--annotations", required=True, help="the ground-truth COCO instances JSON")
    parser.add_argument("--output-dir", required=True, help="where report.html, the plots and metrics.json go")
    parser.add_argument("--iou-type", choices=("bbox", "segm"), default=None,
                        help="what to analyse (default: bbox if the results have 'bbox', else segm)")
    parser.add_argument("--calibration-bins", type=int, default=10, help="equal-width confidence bins (10)")
    parser.add_argument("--top-images", type=int, default=20,
                        help="how many of the images that lose the most AP50 to list (20)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs the analysis; returns the exit code."""
    if args.calibration_bins < 1:
        parser.error(f"--calibration-bins must be >= 1, got {args.calibration_bins}")
    if args.top_images < 0:
        parser.error(f"--top-images must be >= 0, got {args.top_images}")
    analyze(args.results, args.annotations, args.output_dir, iou_type=args.iou_type,
            calibration_bins=args.calibration_bins, top_images=args.top_images, progress=not args.no_progress)
    return 0


def analyze(results: str, annotations: str, output_dir: str, *, iou_type: str | None = None,
            calibration_bins: int = 10, top_images: int = 20, progress: bool = True) -> None:
    """The analysis with the command's console logging; bad input is a :class:`CommandError` (also
    used by ``eval --analyze``)."""
    from resnet_det.evaluation.analysis import analyze_results

    try:
        with console_logging():
            analyze_results(results, annotations, iou_type=iou_type, output_dir=output_dir,
                            calibration_bins=calibration_bins, top_images=top_images, progress=progress)
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:
        raise CommandError(one_line(e)) from None

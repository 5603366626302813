#!/usr/bin/env python
"""Evaluate detections with pycocotools (thin CLI; the logic lives in ``detection.evaluation``).

Results mode (a COCO results JSON against an instances JSON)::

    python tools/eval.py --results results.json --annotations instances_val2017.json \\
        [--iou-types bbox segm] [--output-dir DIR]

prints pycocotools' 12-line table per iou type and the per-category AP table, and with
``--output-dir`` writes ``metrics.json`` and ``pr_curve_<iou_type>.png``. Metrics are fractions.

Checkpoint mode (build the model from a config, run it on the val split)::

    python tools/eval.py CONFIG --checkpoint PATH [key=value ...]

is not available yet (see :func:`main_checkpoint`).

Exit codes: 0 success; 2 bad input (missing/invalid file, empty results, ids not in the
annotations, bad arguments), with a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "eval.py"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of both modes."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="COCO bbox/segm evaluation through pycocotools (metrics as fractions, as "
        "pycocotools prints them).",
    )
    parser.add_argument("config", nargs="?", help="checkpoint mode: the model config (YAML)")
    parser.add_argument("opts", nargs="*", metavar="key=value", help="checkpoint mode: config overrides")
    parser.add_argument("--checkpoint", help="checkpoint mode: the weights to evaluate")
    parser.add_argument("--results", help="results mode: a COCO results JSON (list of detections)")
    parser.add_argument("--annotations", help="results mode: the ground-truth COCO instances JSON")
    parser.add_argument(
        "--iou-types", nargs="+", choices=("bbox", "segm"), default=None,
        help="iou types to evaluate (default: inferred from the results: bbox if they have 'bbox', "
        "segm if they have 'segmentation')",
    )  # fmt: skip
    parser.add_argument("--output-dir", help="write metrics.json and the precision-recall plots here")
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main_results(args: argparse.Namespace) -> int:
    """Results mode: evaluates ``args.results`` against ``args.annotations``.

    Args:
        args: Parsed arguments with ``results``, ``annotations``, ``iou_types``, ``output_dir``.

    Returns:
        0 on success, 2 on bad input (after printing a one-line message to stderr).
    """
    from detection.evaluation import evaluate_results_json

    try:
        evaluate_results_json(args.results, args.annotations, iou_types=args.iou_types,
                              output_dir=args.output_dir)
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main_checkpoint(args: argparse.Namespace) -> int:
    """Checkpoint mode: builds the model of ``args.config`` (with ``args.opts`` overrides), loads
    ``args.checkpoint`` (this project's ``.safetensors``/``.pth`` or a torchvision detection checkpoint)
    and evaluates it on the config's val split: the COCO tables (bbox, and segm for Mask R-CNN) and/or
    mean IoU, with plots in ``train.output_dir``/eval (or ``--output-dir``).

    Args:
        args: Parsed arguments with ``config``, ``checkpoint``, ``opts`` and ``output_dir``.

    Returns:
        The exit code.
    """
    import segmentation  # noqa: F401  (registers the instance / semantic / panoptic tasks)
    from detection.config import load_config
    from detection.engine.launch import evaluate_checkpoint

    if not Path(args.checkpoint).is_file():
        return _fail(f"--checkpoint {args.checkpoint!r} does not exist")
    opts = list(args.opts)
    if args.output_dir:
        opts.append(f"train.output_dir={args.output_dir}")
    try:
        cfg = load_config(args.config, opts)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    evaluate_checkpoint(cfg, args.checkpoint)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs the chosen mode; returns the exit code."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.results is not None or args.annotations is not None:
        if args.results is None or args.annotations is None:
            parser.error("results mode needs both --results and --annotations")
        if args.config is not None or args.checkpoint is not None or args.opts:
            parser.error("--results/--annotations cannot be combined with CONFIG/--checkpoint")
        return main_results(args)
    if args.config is None:
        parser.error("give --results and --annotations (results mode) or CONFIG --checkpoint PATH")
    if args.checkpoint is None:
        parser.error("checkpoint mode needs --checkpoint PATH")
    return main_checkpoint(args)


if __name__ == "__main__":
    sys.exit(main())

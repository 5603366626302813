"""``resnet-det eval``: COCO evaluation (faster-coco-eval, or pycocotools), of a checkpoint or of a results file.

Checkpoint mode (build the config's model, load the weights, run it on the config's val split)::

    resnet-det eval CONFIG --checkpoint PATH [key=value ...] [--output-dir DIR]

prints the COCO tables (bbox, and segm for Mask R-CNN) and/or the mean IoU, and writes metrics and
plots into ``train.output_dir``/eval (``--output-dir`` sets ``train.output_dir``). The checkpoint is
this project's (``.safetensors``/``.pth``) or a torchvision detection checkpoint. ``test.aug.flip=true``,
``test.aug.min_sizes=[...]``, ``test.aug.max_size=N`` evaluate under test-time augmentation (Faster and Mask
R-CNN); ``test.use_ema=true`` evaluates the checkpoint's EMA weights.

Results mode (a COCO results JSON against an instances JSON)::

    resnet-det eval --results results.json --annotations instances_val2017.json \\
        [--iou-types bbox segm] [--output-dir DIR] [--backend pycocotools]

prints pycocotools' 12-line table per iou type and the per-category AP table (stdout), and with
``--output-dir`` writes ``metrics.json`` and ``pr_curve_<iou_type>.png``. Metrics are fractions.
Results mode imports no torch: start-up costs a fraction of a second, not seconds. The time of each stage
(load, validate, prepare, evaluate, accumulate, report) and, for long evaluations, a progress line every
10 s go to stderr (a bar instead, on a terminal).

Backends (``--backend``, both modes): ``faster-coco-eval`` (default; C++, pycocotools' numbers) or
``pycocotools`` (the reference); without faster-coco-eval installed, pycocotools with one warning.

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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--backend", choices=("faster-coco-eval", "pycocotools"), default=None,
                        help="the COCO evaluator (default faster-coco-eval; pycocotools is the reference)")
    parser.add_argument("--results", help="results mode: a COCO results JSON (list of detections)")
    parser.add_argument("--annotations", help="results mode: the ground-truth COCO instances JSON")
    parser.add_argument(
        "--iou-types", nargs="+", choices=("bbox", "segm"), default=None,
        help="results mode: iou types to evaluate (default: inferred from the results: bbox if they have "
        "'bbox', segm if they have 'segmentation')",
    )  # fmt: skip
    parser.add_argument("--output-dir", help="write metrics.json and the plots here (checkpoint mode: "
                        "sets train.output_dir, the files go to its eval/ folder)")
    parser.add_argument("--analyze", action="store_true", help="results mode: also run `resnet-det analyze` "
                        "(TIDE, calibration, ...) into OUTPUT_DIR/analysis, on the first of --iou-types")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs the mode the arguments choose; returns the exit code."""
    if args.results is not None or args.annotations is not None:
        if args.results is None or args.annotations is None:
            parser.error("results mode needs both --results and --annotations")
        if args.config is not None or args.checkpoint is not None or args.overrides or args.print_config:
            parser.error("--results/--annotations cannot be combined with CONFIG/--checkpoint/--print-config")
        if args.analyze and args.output_dir is None:
            parser.error("--analyze needs --output-dir (the analysis goes to OUTPUT_DIR/analysis)")
        return _results(args)
    if args.analyze:
        parser.error("--analyze works in results mode; for a checkpoint, run `resnet-det analyze` on the "
                     "coco_instances_results.json its evaluation wrote")
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
    # coco_core, not resnet_det.evaluation.coco: a results file needs no torch (seconds and ~0.7 GiB saved)
    from resnet_det.evaluation.coco_core import evaluate_results_json
    from resnet_det_common.io import OutputWriteError

    try:
        evaluate_results_json(args.results, args.annotations, iou_types=args.iou_types,
                              output_dir=args.output_dir, backend=args.backend, progress=not args.no_progress)
    except BrokenPipeError:
        raise
    except OutputWriteError as e:  # metrics.json / a plot on a full disk: the run, not the input
        raise RunFailedError(one_line(e)) from None
    except (OSError, ValueError) as e:
        raise CommandError(one_line(e)) from None
    if args.analyze:
        from .analyze import analyze

        iou_type = args.iou_types[0] if args.iou_types else None
        analyze(args.results, args.annotations, str(Path(args.output_dir) / "analysis"), iou_type=iou_type,
                progress=not args.no_progress)
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    if not Path(args.checkpoint).is_file():
        raise CommandError(f"--checkpoint {args.checkpoint!r} does not exist")
    cfg = load_config_arg(args.config, _overrides(args))
    from backbone.weights import WeightsError
    from resnet_det.data.coco import DatasetError
    from resnet_det.engine.launch import check_test_aug
    from resnet_det.evaluation import set_default_backend
    from resnet_det_common.io import OutputWriteError

    try:
        check_test_aug(cfg, _library.get_task(cfg.model.task))
    except ValueError as e:  # test.aug on a task without test-time augmentation: the config, one line
        raise CommandError(one_line(e)) from None
    set_default_backend(args.backend)  # the task's evaluators are built inside; they take the default
    try:
        _library.evaluate_checkpoint(cfg, args.checkpoint, progress=not args.no_progress)
    except OutputWriteError as e:  # an evaluation file on a full disk: the run, not the input
        raise RunFailedError(one_line(e)) from None
    except (WeightsError, DatasetError, FileNotFoundError) as e:  # the checkpoint (its EMA too) or the data: one line
        raise CommandError(one_line(e)) from None
    finally:
        set_default_backend(None)
    return 0

"""``resnet-det infer``: run a trained model on images or folders: a COCO results JSON and rendered images.

    resnet-det infer CONFIG --checkpoint model_final.safetensors --input img.jpg folder/ --output out/
    resnet-det infer CONFIG --checkpoint model_final.safetensors --show-gt 8 --output out/
    resnet-det infer --onnx model.onnx --input img.jpg folder/ --output out/

CONFIG is the model's config (the ``config.yaml`` written next to the checkpoint works, or a shipped
config's name). With ``--input``: writes ``OUT/results.json`` (every detection) and ``OUT/vis/`` (those
above ``--score-thresh`` drawn). With ``--show-gt N``: draws the first N images of the config's val
split with their ground truth on the left and the predictions on the right, to ``OUT/vis_gt/``.
With ``--onnx`` (a file from ``resnet-det export``; no CONFIG): the same outputs through ONNX Runtime, numpy and
Pillow alone: this path imports neither torch nor the model code (``resnet_det/cli/infer_onnx.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import _library
from ._util import CommandError, RunFailedError, add_config_arguments, load_config_arg, one_line, print_config

HELP = "run a model on images or folders: COCO results JSON and rendered images"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``infer``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, optional=True)
    p.add_argument("--checkpoint", help="weights: ours (.safetensors/.pth) or torchvision's (required without --onnx)")
    p.add_argument("--onnx", metavar="MODEL.onnx",
                   help="run an exported model (resnet-det export) with ONNX Runtime instead: no CONFIG, no torch")
    p.add_argument("--input", nargs="+", help="image files and/or folders (required unless --show-gt)")
    p.add_argument("--show-gt", type=int, metavar="N",
                   help="draw N images of the config's val split: ground truth (left) beside predictions (right)")
    p.add_argument("--output", help="folder for results.json and vis/ (required)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="drawing threshold (results keep all)")
    p.add_argument("--num-classes", type=int, help="foreground classes, if the config has none and no dataset")
    p.add_argument("--class-names", help="JSON list of names (background first) or a COCO annotations file")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass (default 2; --onnx: 1)")
    p.add_argument("--threads", type=int, help="--onnx: ONNX Runtime's intra-op threads (default: its own choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs the model over the inputs; returns 0, or raises :class:`CommandError` for bad input."""
    if args.onnx is not None:
        return _run_onnx(args, parser)
    if args.config is None:
        parser.error("give CONFIG --checkpoint W (the model) or --onnx MODEL.onnx (an exported one)")
    if args.print_config:
        print_config(load_config_arg(args.config, args.overrides))
        return 0
    needed = [("--checkpoint", args.checkpoint), ("--output", args.output)]
    if args.show_gt is None:
        needed.insert(1, ("--input", args.input))
    missing = [flag for flag, value in needed if not value]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.show_gt is not None and args.show_gt < 1:
        parser.error(f"--show-gt must be >= 1, got {args.show_gt}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    cfg = load_config_arg(args.config, args.overrides)
    from resnet_det.engine.inference import run_inference, visualize_dataset
    from resnet_det_common import OutputWriteError, resolve_device

    try:
        names, label_to_cat = _library.read_class_names(args.class_names) if args.class_names else (None, None)
        model, names, label_to_cat = _library.inference_model(cfg, args.checkpoint, num_classes=args.num_classes,
                                                              class_names=names, label_to_cat_id=label_to_cat)
        device = resolve_device(cfg.train.device)
        model.to(device)
        if args.show_gt is not None:
            val = _library.val_dataset(cfg)
            files = visualize_dataset(model, val, args.output, num_images=args.show_gt, device=device,
                                      score_thresh=args.score_thresh, amp=cfg.train.amp,
                                      progress=not args.no_progress)
        if args.input:
            path = run_inference(model, args.input, args.output, device=device, class_names=names,
                                 label_to_cat_id=label_to_cat, score_thresh=args.score_thresh,
                                 batch_size=args.batch_size, amp=cfg.train.amp, progress=not args.no_progress)
    except OutputWriteError as e:  # results.json / a drawing on a full disk: exit 3, not bad input
        raise RunFailedError(one_line(e)) from None
    except (ValueError, FileNotFoundError) as e:
        raise CommandError(one_line(e)) from None
    if args.show_gt is not None:
        print(f"wrote {len(files)} ground truth | prediction images to {Path(args.output) / 'vis_gt'}")
    if args.input:
        print(f"wrote {path} and {Path(args.output) / 'vis'}")
    return 0


def _run_onnx(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--onnx``: ONNX Runtime, numpy and Pillow only (``infer_onnx``); nothing here may import torch."""
    extra = [flag for flag, given in (("CONFIG", args.config), ("--checkpoint", args.checkpoint),
                                      ("--show-gt", args.show_gt is not None), ("key=value", args.overrides),
                                      ("--print-config", args.print_config), ("--num-classes", args.num_classes))
             if given]
    if extra:
        parser.error(f"--onnx runs the exported file alone: drop {', '.join(extra)}")
    missing = [flag for flag, value in (("--input", args.input), ("--output", args.output)) if not value]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    from .infer_onnx import read_class_names, run_onnx_inference

    try:
        names, label_to_cat = read_class_names(args.class_names) if args.class_names else (None, None)
        path = run_onnx_inference(args.onnx, args.input, args.output, class_names=names, label_to_cat_id=label_to_cat,
                                  score_thresh=args.score_thresh, progress=not args.no_progress, threads=args.threads)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise CommandError(one_line(e)) from None
    print(f"wrote {path} and {Path(args.output) / 'vis'}")
    return 0

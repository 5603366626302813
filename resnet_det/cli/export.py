"""``resnet-det export``: a trained detector as one ONNX file (ONNX Runtime runs it alone) or a ``torch.export``
program.

    resnet-det export CONFIG --checkpoint model_final.safetensors --format onnx --output model.onnx
    resnet-det export CONFIG --checkpoint model_final.safetensors --format torch-export --output model.pt2

CONFIG is the model's config (the ``config.yaml`` written next to the checkpoint works, or a shipped config's
name): Faster R-CNN (FPN or C4) or Mask R-CNN. The graph takes one image, uint8 ``(H, W, 3)`` RGB of any size,
and gives ``boxes`` float32 ``(D, 4)`` xyxy in that image's pixels, ``scores`` ``(D,)``, ``labels`` int64
``(D,)`` (1..num_classes, the model's labels) and, for Mask R-CNN, ``masks`` float32 ``(D, 1, H, W)``
probabilities: resizing, normalisation, box decoding, NMS and mask pasting are inside it.
``resnet-det infer --onnx model.onnx --input DIR --output OUT`` runs an ONNX file without torch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import _library
from ._util import CommandError, RunFailedError, add_config_arguments, load_config_arg, one_line, print_config

HELP = "export a detector to ONNX (runs in ONNX Runtime alone) or to a torch.export program"
FORMATS = ("onnx", "torch-export")


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``export``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--checkpoint", help="weights: ours (.safetensors/.pth) or torchvision's (required)")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="onnx (default) or torch-export")
    p.add_argument("--output", help="the file to write, e.g. model.onnx or model.pt2 (required)")
    p.add_argument("--num-classes", type=int, help="foreground classes, if the config has none and no dataset")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Builds the model, loads the checkpoint, exports; returns 0, or raises :class:`CommandError` for bad input."""
    if args.print_config:
        print_config(load_config_arg(args.config, args.overrides))
        return 0
    missing = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--output", args.output)) if not value]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if not Path(args.checkpoint).is_file():
        raise CommandError(f"--checkpoint {args.checkpoint!r} does not exist")
    if Path(args.output).is_dir():
        raise CommandError(f"--output {args.output!r} is a folder; give the file to write, e.g. "
                           f"{Path(args.output) / ('model.onnx' if args.format == 'onnx' else 'model.pt2')}")
    cfg = load_config_arg(args.config, args.overrides)
    if cfg.model.task not in ("detection", "instance"):
        raise CommandError(f"model.task={cfg.model.task!r}: export covers detectors (task 'detection': Faster "
                           "R-CNN, 'instance': Mask R-CNN); semantic and panoptic models have no export path yet")
    from backbone.weights import WeightsError
    from resnet_det_common.io import OutputWriteError
    from segmentation.export import export

    try:
        model, _, _ = _library.inference_model(cfg, args.checkpoint, num_classes=args.num_classes)
        start = time.perf_counter()
        path = export(model.eval(), args.output, args.format)
    except OutputWriteError as e:  # the ONNX / .pt2 file on a full disk: the run failed (exit 3), not the input
        raise RunFailedError(one_line(e)) from None
    except (WeightsError, FileNotFoundError, TypeError, ValueError) as e:
        raise CommandError(one_line(e)) from None
    outputs = "boxes, scores, labels" + (", masks" if hasattr(model.roi_heads, "mask_head") else "")
    print(f"wrote {path} ({args.format}, {path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s:"
          f" image uint8 (H, W, 3) RGB -> {outputs}")
    return 0

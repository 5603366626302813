"""``resnet-det train``: train and evaluate a model from a config.

    resnet-det train shapes/faster_rcnn_R_50_FPN [key.sub=value ...] [--resume] [--no-progress]
    resnet-det train coco/faster_rcnn_R_50_FPN_1x data.root=/data/coco
    torchrun --nproc_per_node 8 -m resnet_det train coco/faster_rcnn_R_50_FPN_1x data.root=/data/coco

Writes the resolved ``config.yaml``, checkpoints, ``metrics.jsonl``, ``log.txt`` and ``curves.png``
into ``train.output_dir`` and ends with a ``final: bbox/AP ...`` line.

Exit codes: 0 done; 2 bad input (config, data, weights, a checkpoint that cannot be resumed); 3 the run
failed (disk full while writing a checkpoint, metrics.jsonl, log.txt, curves.png or an evaluation file, a lost
process, a non-finite loss: the last complete checkpoint is named, continue with --resume once fixed);
130 Ctrl-C (the last completed iteration was saved first).
"""

from __future__ import annotations

import argparse

from . import _library
from ._util import (
    CommandError,
    RunFailedError,
    add_config_arguments,
    console_logging,
    load_config_arg,
    one_line,
    print_config,
)

HELP = "train and evaluate a model from a config (CPU, GPU, torchrun)"
SHOWN = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50", "sem_seg/mIoU")


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``train``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return parser


def _kept(output_dir: str) -> str:
    """What is safe on disk after a failed write, and what to do."""
    from resnet_det.engine.checkpoint import last_checkpoint_name

    name = last_checkpoint_name(output_dir)
    kept = f"the last complete checkpoint is '{name}'" if name else "no checkpoint was completed"
    return f"{kept} in {output_dir}. Free space there (or fix the folder) and continue with --resume"


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Trains; returns 0, or raises :class:`CommandError` for a bad config, path, dataset or weights."""
    cfg = load_config_arg(args.config, args.overrides)
    if args.print_config:
        print_config(cfg)
        return 0
    from backbone.weights import WeightsError
    from resnet_det.data.coco import DatasetError
    from resnet_det.engine.checkpoint import CheckpointError, CheckpointWriteError
    from resnet_det.evaluation.registry import get_metric
    from resnet_det_common.dist import ProcessGroupError
    from resnet_det_common.io import OutputWriteError

    with console_logging():
        try:
            result = _library.train(cfg, resume=args.resume, progress=not args.no_progress)
        except (CheckpointWriteError, ProcessGroupError, FloatingPointError) as e:  # the run, not the input
            raise RunFailedError(one_line(e)) from None
        except OutputWriteError as e:  # metrics.jsonl, log.txt, curves.png, evaluation files on a full disk
            raise RunFailedError(f"{one_line(e)}; {_kept(cfg.train.output_dir)}") from None
        except (FileNotFoundError, DatasetError, WeightsError, CheckpointError) as e:  # bad paths, data, files
            raise CommandError(one_line(e)) from None
    ev = result.get("eval") or {}  # flattened metric names, e.g. "bbox/AP", "segm/AP", "sem_seg/mIoU"
    headline = [*SHOWN, *(k for name in cfg.test.metrics for k in get_metric(name).headline)]
    shown = [f"{k} {ev[k]:.3f}" for k in headline if isinstance(ev.get(k), float | int)]
    if shown:
        print(f"final: {', '.join(shown)} ({result.get('iteration')} iterations, "
              f"{result.get('train_minutes', 0):.1f} min)")
    return 0

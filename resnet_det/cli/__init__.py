"""The ``resnet-det`` command (also ``python -m resnet_det``, and the scripts in ``tools/``).

    resnet-det train shapes/faster_rcnn_R_50_FPN [key.sub=value ...] [--resume] [--no-progress]
    resnet-det eval CONFIG --checkpoint W        |  resnet-det eval --results R.json --annotations A.json
    resnet-det analyze --results R.json --annotations A.json --output-dir D   (TIDE, calibration, ...)
    resnet-det infer CONFIG --checkpoint W --input IMG_OR_DIR --output OUT
    resnet-det export CONFIG --checkpoint W --format onnx --output model.onnx
    resnet-det infer --onnx model.onnx --input IMG_OR_DIR --output OUT   (ONNX Runtime, no torch)
    resnet-det configs                           (the shipped configs, by name)
    resnet-det benchmark | benchmark-eval | make-shapes | paper-study | degradation-study ...

One module per subcommand, each with ``HELP`` (its line in ``resnet-det --help``),
``build_parser(prog)`` and ``run(args, parser) -> exit code``. Options and ``key=value`` overrides
mix in any order (``parse_intermixed_args``). This package is the top layer: the library never imports it.

Exit codes (every failure is one line ``PROG: error: ...`` on stderr, with no traceback):

- 0: success.
- 2: bad input: usage (argparse's usage, then the error line), an unknown config, a bad override or
  value, a missing, damaged or refused file (a checkpoint, weights, a results file, a dataset).
- 3: the run failed for a reason outside its input: a full disk while saving, another process of a
  distributed run died or went silent, a non-finite loss. The last complete checkpoint is intact
  and the message names it: fix the cause and continue with ``--resume``.
- 130: interrupted (Ctrl-C); ``train`` saved the last completed iteration first.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Sequence

from ._util import CommandError, RunFailedError, one_line

__all__ = ["COMMANDS", "CommandError", "RunFailedError", "main"]

# subcommand -> module of this package (imported only when that subcommand runs: `configs` needs no torch)
COMMANDS: dict[str, str] = {
    "train": "train",
    "eval": "eval",
    "analyze": "analyze",
    "infer": "infer",
    "export": "export",
    "configs": "configs",
    "benchmark": "benchmark",
    "benchmark-startup": "benchmark_startup",
    "benchmark-eval": "benchmark_eval",
    "make-shapes": "make_shapes",
    "convert": "convert",
    "paper-study": "paper_study",
    "degradation-study": "degradation_study",
}
PROG = "resnet-det"


def _usage() -> str:
    return f"usage: {PROG} COMMAND [options] [key=value ...]   ({PROG} COMMAND --help for its options)"


def _help() -> str:
    lines = [_usage(), "", "ResNet backbones, Faster R-CNN / Mask R-CNN / semantic FPN: train, evaluate, infer.", "",
             "commands:"]
    width = max(len(c) for c in COMMANDS)
    for command, module in COMMANDS.items():
        lines.append(f"  {command:<{width}}  {importlib.import_module(f'{__name__}.{module}').HELP}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Runs ``resnet-det COMMAND ...``.

    Args:
        argv: The arguments after the program name, the subcommand first (default ``sys.argv[1:]``).
        prog: The name usage and error lines start with (default ``"resnet-det COMMAND"``); the
            ``tools/`` scripts pass their file name.

    Returns:
        The exit code: 0 success, 2 bad input or usage (argparse's usage errors raise ``SystemExit(2)``),
        3 a failed run (see the module docstring), 130 interrupted.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_help(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version":
        from resnet_det import __version__

        print(f"{PROG} {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        print(f"{PROG}: error: unknown command {command!r}{hint} (commands: {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{COMMANDS[command]}")
    parser = module.build_parser(prog or f"{PROG} {command}")
    parsed = parser.parse_intermixed_args(rest)
    try:
        return module.run(parsed, parser)
    except CommandError as e:
        print(f"{parser.prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except RunFailedError as e:
        print(f"{parser.prog}: error: {one_line(e)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`resnet-det configs | head`): not an error of the run. Point
        # stdout at devnull so the interpreter's final flush does not raise again, and exit as `cat` does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141

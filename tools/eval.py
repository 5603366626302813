#!/usr/bin/env python
"""COCO evaluation of a checkpoint or of a COCO results JSON.

`python tools/eval.py ARGS` is `resnet-det eval ARGS` (`--help` lists the options);
the code is in resnet_det/cli/. The package must be installed (`make` installs it): no sys.path edits.
"""

import sys

from resnet_det.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Runs `resnet-det eval` with `argv` (default: this script's arguments); returns the exit code."""
    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)], prog="eval.py")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The ResNet paper's VGG-16 vs ResNet-101 Faster R-CNN study.

`python tools/paper_study.py ARGS` is `resnet-det paper-study ARGS` (`--help` lists the options);
the code is in resnet_det/cli/. The package must be installed (`make` installs it): no sys.path edits.
"""

import sys

from resnet_det.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Runs `resnet-det paper-study` with `argv` (default: this script's arguments); returns the exit code."""
    return cli_main(["paper-study", *(sys.argv[1:] if argv is None else argv)], prog="paper_study.py")


if __name__ == "__main__":
    sys.exit(main())

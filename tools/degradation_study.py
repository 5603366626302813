#!/usr/bin/env python
"""The ResNet paper's CIFAR-10 degradation study.

`python tools/degradation_study.py ARGS` is `resnet-det degradation-study ARGS` (`--help` lists the options);
the code is in resnet_det/cli/. The package must be installed (`make` installs it): no sys.path edits.
"""

import sys

from resnet_det.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Runs `resnet-det degradation-study` with `argv` (default: this script's arguments); returns the exit code."""
    return cli_main(["degradation-study", *(sys.argv[1:] if argv is None else argv)], prog="degradation_study.py")


if __name__ == "__main__":
    sys.exit(main())

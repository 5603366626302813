#!/usr/bin/env python
"""Speed and memory of our Faster R-CNN against torchvision's.

`python tools/benchmark.py ARGS` is `resnet-det benchmark ARGS` (`--help` lists the options);
the code is in resnet_det/cli/. The package must be installed (`make` installs it): no sys.path edits.
"""

import sys

from resnet_det.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Runs `resnet-det benchmark` with `argv` (default: this script's arguments); returns the exit code."""
    return cli_main(["benchmark", *(sys.argv[1:] if argv is None else argv)], prog="benchmark.py")


if __name__ == "__main__":
    sys.exit(main())

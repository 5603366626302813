#!/usr/bin/env python
"""Run a trained model on images or folders.

`python tools/infer.py ARGS` is `resnet-det infer ARGS` (`--help` lists the options);
the code is in resnet_det/cli/. The package must be installed (`make` installs it): no sys.path edits.
"""

import sys

from resnet_det.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Runs `resnet-det infer` with `argv` (default: this script's arguments); returns the exit code."""
    return cli_main(["infer", *(sys.argv[1:] if argv is None else argv)], prog="infer.py")


if __name__ == "__main__":
    sys.exit(main())

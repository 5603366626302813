#!/usr/bin/env python
"""Train and evaluate a detector from a YAML config.

`python tools/train.py ARGS` is `resnet-det train ARGS` (`--help` lists the options);
the code is in resnet_det/cli/. The package must be installed (`make` installs it): no sys.path edits.
"""

import sys

from resnet_det.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Runs `resnet-det train` with `argv` (default: this script's arguments); returns the exit code."""
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)], prog="train.py")


if __name__ == "__main__":
    sys.exit(main())

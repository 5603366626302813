#!/usr/bin/env python
"""Generate the synthetic shapes dataset.

`python tools/make_shapes.py ARGS` is `resnet-det make-shapes ARGS` (`--help` lists the options);
the code is in resnet_det/cli/. The package must be installed (`make` installs it): no sys.path edits.
"""

import sys

from resnet_det.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Runs `resnet-det make-shapes` with `argv` (default: this script's arguments); returns the exit code."""
    return cli_main(["make-shapes", *(sys.argv[1:] if argv is None else argv)], prog="make_shapes.py")


if __name__ == "__main__":
    sys.exit(main())

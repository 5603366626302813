"""``python -m resnet_det ...`` is ``resnet-det ...`` (see :mod:`resnet_det.cli`)."""

import sys

from resnet_det.cli import main

if __name__ == "__main__":
    sys.exit(main())

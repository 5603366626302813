"""Makes `engine_fakes` importable as a top-level module.

Spawned worker processes (DDP tests) unpickle their entry point by module name, and
multiprocessing passes the parent's sys.path to them, so the helper must live on sys.path rather
than under pytest's importlib-mode module names.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

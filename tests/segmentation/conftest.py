"""Fixtures of the segmentation tests; puts this folder on sys.path so that `import seghelpers` works."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: the tiny models' small kernels gain nothing from a second one, and on a shared
    (oversubscribed) 2-core machine OpenMP threads spin-wait on each other and a test runs many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

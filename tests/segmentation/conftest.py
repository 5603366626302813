"""Fixtures of the segmentation tests (`import seghelpers` works through pytest's `pythonpath` setting)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: the tiny models' small kernels gain nothing from a second one, and on a shared
    (oversubscribed) 2-core machine OpenMP threads spin-wait on each other and a test runs many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Fixtures of the detector tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread. The detector tests use tiny models, whose small kernels gain
    nothing from a second thread; on a shared (oversubscribed) 2-core machine the OpenMP threads of a
    tiny model spin-wait on each other and the same test runs up to ~80x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Fixtures of the study tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: tiny models gain nothing from a second thread, and on a shared
    2-core machine the OpenMP threads of a tiny model spin-wait on each other (up to ~80x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

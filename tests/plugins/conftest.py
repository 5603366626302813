"""Downstream-library tests: small CPU models, one intra-op thread (tiny kernels gain nothing from a
second one, and on a shared 2-core machine OpenMP spin-waiting slows them down many times)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Fixtures of the engine tests.

`engine_fakes` is importable as a top-level module (pytest's `pythonpath` setting in pyproject.toml
lists this folder): spawned worker processes (DDP tests) unpickle their entry point by module name,
and multiprocessing passes the parent's sys.path to them.
"""

from __future__ import annotations

import signal

import pytest


@pytest.fixture(autouse=True)
def _default_sigint():
    """Ctrl-C tests need Python's default SIGINT handler. A process started in the background by a
    non-interactive shell (`cmd &`, CI runners) inherits SIGINT as *ignored*, and the trainer rightly
    leaves an ignored SIGINT alone; restore the default for the test's duration."""
    prev = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, prev if prev is not None else signal.SIG_DFL)


@pytest.fixture
def single_thread():
    """One intra-op thread: the tiny detector's small kernels gain nothing from a second thread, and on a
    shared (oversubscribed) 2-core machine OpenMP threads spin-wait on each other (a step of ~0.12 s takes
    10 s and more)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

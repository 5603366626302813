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

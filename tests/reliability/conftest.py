"""Fixtures of the reliability tests: a tiny real training run, the reference every broken run is compared
with (the run itself and the comparison: :mod:`faults`, in tests/engine, on pytest's pythonpath).

Every run is the real ``resnet-det`` command on the real stack: a ResNet-18 Faster R-CNN of width 8 on
64-px synthetic shapes, the real data loader with 2 worker processes, a checkpoint every iteration and a
COCO evaluation at the end. Runs happen in children of a forkserver (:mod:`faults`), where the faults are
installed; none is installed in production code.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import faults
import pytest


@pytest.fixture(scope="session")
def shapes_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The children's environment: one synthetic-shapes cache for the whole session."""
    return {"RESNET_DET_CACHE": str(tmp_path_factory.mktemp("shapes_cache"))}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, shapes_env: dict[str, str]) -> Path:
    """The uninterrupted run: 4 iterations, checkpoints model_0000001..3 and model_final, final evaluation."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, log = faults.run_cli(faults.train_argv(out), log=out.parent / "train.log", env=shapes_env)
    assert code == 0, log[-4000:]
    return out


@pytest.fixture
def copy_of(tmp_path: Path) -> Callable[[Path], Path]:
    """A writable copy of a run folder (the session's reference stays untouched)."""

    def copy(run: Path) -> Path:
        dst = tmp_path / run.name
        shutil.copytree(run, dst)
        return dst

    return copy


@pytest.fixture
def single_thread():
    """One intra-op thread (the measured tolerances of the precision tests were taken so; tiny models gain
    nothing from a second thread on a shared 2-core machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Fixtures of the evaluation tests. `import evalhelpers` works because pytest's `pythonpath` setting
(pyproject.toml) lists this folder, also in the processes torch.multiprocessing.spawn starts."""

from __future__ import annotations

from pathlib import Path

import evalhelpers
import pytest


@pytest.fixture
def gt_path(tiny_coco_src: Path) -> Path:
    """The read-only tiny COCO instances file."""
    return tiny_coco_src / "annotations.json"


@pytest.fixture
def gt(gt_path: Path):
    """A fresh pycocotools COCO of tiny COCO (each test its own: COCOeval mutates it)."""
    return evalhelpers.quiet_coco(gt_path)

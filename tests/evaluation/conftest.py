"""Fixtures of the evaluation tests; puts this folder on sys.path so that `import evalhelpers` works
(also in the processes that torch.multiprocessing.spawn starts, which inherit sys.path)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import evalhelpers  # noqa: E402


@pytest.fixture
def gt_path(tiny_coco_src: Path) -> Path:
    """The read-only tiny COCO instances file."""
    return tiny_coco_src / "annotations.json"


@pytest.fixture
def gt(gt_path: Path):
    """A fresh pycocotools COCO of tiny COCO (each test its own: COCOeval mutates it)."""
    return evalhelpers.quiet_coco(gt_path)

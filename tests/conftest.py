"""Shared fixtures. Tests run on CPU in a few minutes; they never download anything."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Nothing downloads in tests: weights come from files the tests write themselves.
os.environ["RESNET_DET_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
TINY_COCO = REPO / "tests" / "data" / "tiny_coco"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_coco_src() -> Path:
    """The read-only tiny COCO folder (16 real train2017 images)."""
    if not (TINY_COCO / "annotations.json").is_file():
        raise FileNotFoundError(
            f"tiny COCO data not found at {TINY_COCO}; it is part of the repository "
            "(tests/data/tiny_coco): restore it with git checkout"
        )
    return TINY_COCO


@pytest.fixture
def tiny_coco(tmp_path: Path, tiny_coco_src: Path) -> Path:
    """A writable copy of tiny COCO: `<tmp>/tiny_coco/{annotations.json,images/}`."""
    dst = tmp_path / "tiny_coco"
    shutil.copytree(tiny_coco_src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    dst.chmod(0o755)
    return dst

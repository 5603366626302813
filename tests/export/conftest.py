"""Fixtures of the export tests: the 16 tiny-COCO images as uint8 (H, W, 3) RGB arrays, at their own sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMAGES = sorted((Path(__file__).resolve().parents[1] / "data" / "tiny_coco" / "images").glob("*.jpg"))


@pytest.fixture(scope="session")
def coco_images() -> list[tuple[str, np.ndarray]]:
    """`(file name, uint8 (H, W, 3) RGB)` of each tiny-COCO image."""
    assert len(IMAGES) == 16, IMAGES
    return [(p.name, np.asarray(Image.open(p).convert("RGB")).copy()) for p in IMAGES]


@pytest.fixture
def single_thread():
    """One intra-op thread for torch (and ONNX Runtime rows, which take torch's count): a shared 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""The tiny real detector of the training-feature tests (EMA, accumulation, checkpointing) and its data.

A width-8 ResNet-18 FPN Faster R-CNN on 64-px images (about a second per training step on one core), and
a resumable loader over a fixed list of batches of synthetic boxes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from detection import build_faster_rcnn

TINY = dict(num_classes=3, backbone_name="resnet18", backbone_width=8, fpn_channels=16, fc_dim=32, min_size=(64,),
            max_size=64, test_min_size=64, test_max_size=64, rpn_pre_nms_topk=(200, 100),
            rpn_post_nms_topk=(100, 50))


def tiny_detector(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The tiny Faster R-CNN (FrozenBN backbone, no norm in the FPN and the 2fc box head), seeded."""
    torch.manual_seed(seed)
    return build_faster_rcnn(**{**TINY, **overrides})


def tiny_images(n: int, seed: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """``n`` 64x64 images in [0, 1] with 1-3 bright boxes each, and their targets (labels 1..3)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, 64, 64, generator=g) * 0.3
        k = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.randint(0, 40, (k, 2), generator=g).float()
        wh = torch.randint(12, 24, (k, 2), generator=g).float()
        boxes = torch.cat([xy, (xy + wh).clamp(max=64)], dim=1)
        for x0, y0, x1, y1 in boxes.long().tolist():
            img[:, y0:y1, x0:x1] += 0.6
        images.append(img.clamp(0, 1))
        targets.append({"boxes": boxes, "labels": torch.randint(1, 4, (k,), generator=g)})
    return images, targets


class ListLoader:
    """An endless loader cycling over fixed batches, with the position as its state (as the real one)."""

    def __init__(self, batches: list[tuple[list[Tensor], list[dict[str, Tensor]]]]) -> None:
        self.batches = batches
        self.position = 0

    def __iter__(self):
        while True:
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

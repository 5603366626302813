"""Both NMS strategies (per group on CPU, per image with float64 offsets on GPU) equal plain per-group NMS."""

from __future__ import annotations

import torch
from parity_helpers import per_group_nms

from detection.boxes import batched_nms_exact


def test_nms_strategies_match_per_group_nms() -> None:
    g = torch.Generator().manual_seed(0)
    n = 600
    xy = torch.rand(n, 2, generator=g) * 1300
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 200 + 1], dim=1)
    scores = torch.rand(n, generator=g)
    images = torch.randint(0, 3, (n,), generator=g)
    groups = images * 80 + torch.randint(0, 80, (n,), generator=g)  # image x class, as in post-processing
    ref = per_group_nms(boxes, scores, groups, 0.5)
    for split in ("group", "image"):
        keep = batched_nms_exact(boxes, scores, groups, 0.5, images, 3, split=split)
        assert set(keep.tolist()) == ref, split
        assert torch.all(scores[keep][:-1] >= scores[keep][1:]), "sorted by decreasing score"


def test_nms_empty() -> None:
    empty = torch.zeros(0, 4)
    assert batched_nms_exact(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0

"""End to end: a tiny from-scratch Faster R-CNN memorises two synthetic images. If any part of the
training math is wrong (anchor/target alignment, box coding signs, label offsets, loss masks, the
mapping of detections back to the image) the loss stalls or the detections land in the wrong place."""

from __future__ import annotations

import pytest
import torch

from detection.boxes import pairwise_iou
from detection.models import build_faster_rcnn

pytestmark = pytest.mark.usefixtures("single_thread")

RECTANGLE, ELLIPSE = 1, 2
COLOURS = {RECTANGLE: (0.9, 0.2, 0.1), ELLIPSE: (0.1, 0.4, 0.95)}


def scene(g: torch.Generator, objects: list[tuple[int, tuple[float, float, float, float]]]
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A 128 x 128 noise image with filled rectangles (class 1) and ellipses (class 2) in given boxes."""
    img = torch.rand(3, 128, 128, generator=g) * 0.4
    yy, xx = torch.meshgrid(torch.arange(128.0) + 0.5, torch.arange(128.0) + 0.5, indexing="ij")
    for kind, (x1, y1, x2, y2) in objects:
        if kind == RECTANGLE:
            inside = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
        else:
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        colour = torch.tensor(COLOURS[kind])[:, None]
        img[:, inside] = colour + 0.05 * torch.randn(3, int(inside.sum()), generator=g)
    boxes = torch.tensor([box for _, box in objects], dtype=torch.float32)
    labels = torch.tensor([kind for kind, _ in objects], dtype=torch.int64)
    return img.clamp(0, 1), {"boxes": boxes, "labels": labels}


def test_tiny_model_overfits_two_images() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [
        scene(g, [(RECTANGLE, (10, 12, 58, 50)), (ELLIPSE, (70, 20, 118, 76)), (RECTANGLE, (30, 80, 70, 120))]),
        scene(g, [(ELLIPSE, (8, 8, 48, 56)), (RECTANGLE, (60, 60, 120, 100))]),
    ]
    images, targets = [d[0] for d in data], [d[1] for d in data]
    # From scratch, so GroupNorm (FrozenBN would leave a random deep net unnormalised; GN behaves the same in
    # train and eval mode, unlike BN on a batch of two).
    model = build_faster_rcnn(backbone_name="resnet18", backbone_width=8, num_classes=2, backbone_norm="GN",
                              freeze_at=0, fpn_channels=32, fc_dim=64, min_size=(128,), max_size=160,
                              test_min_size=128, test_max_size=160, rpn_batch_size_per_image=64,
                              roi_batch_size_per_image=64, rpn_pre_nms_topk=(600, 300), rpn_post_nms_topk=(300, 100))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    history = []
    for _ in range(150):
        losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert all(torch.isfinite(torch.tensor(history)))
    final = sum(history[-5:]) / 5
    assert final * 10 <= history[0], f"total loss fell from {history[0]:.3f} to only {final:.3f}"

    model.eval()
    with torch.no_grad():
        detections = model(images)
    for i, (det, tgt) in enumerate(zip(detections, targets)):
        n = len(tgt["boxes"])
        assert len(det["boxes"]) >= n
        # The n best detections are the n objects, each with its own class, and nothing else.
        top_boxes, top_labels, top_scores = det["boxes"][:n], det["labels"][:n], det["scores"][:n]
        assert (top_scores > 0.5).all(), f"image {i}: top scores {top_scores.tolist()}"
        iou = pairwise_iou(tgt["boxes"], top_boxes)  # (gt, det)
        for k in range(n):
            hit = (iou[k] > 0.5) & (top_labels == tgt["labels"][k])
            assert hit.any(), (f"image {i}: object {k} ({tgt['boxes'][k].tolist()}, label {int(tgt['labels'][k])}) "
                               f"not among {top_boxes.tolist()} / {top_labels.tolist()}")
        assert (iou.max(dim=0).values > 0.5).all(), f"image {i}: a top detection matches no object"
        # Anything below the objects is a weak duplicate or background.
        if len(det["scores"]) > n:
            assert det["scores"][n] < 0.5

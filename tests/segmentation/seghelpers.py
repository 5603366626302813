"""Tiny models and toy batches for the segmentation tests (CPU-sized: seconds, not minutes)."""

from __future__ import annotations

import torch

from detection.specs import ModelSpec
from segmentation import (
    MaskRCNN,
    PanopticFPN,
    SemanticFPN,
    build_mask_rcnn,
    build_panoptic_fpn,
    build_semantic_fpn,
)

NUM_CLASSES = 4  # background + 3: what the models predict (the spec counts the 3 foreground classes)


def tiny_spec(**overrides) -> ModelSpec:
    """A narrow ResNet-18 FPN model on ~64-96 px inputs (every code path of the full model)."""
    spec = ModelSpec(num_classes=NUM_CLASSES - 1).replace(
        backbone_name="resnet18", backbone_norm="GN", freeze_at=0, backbone_width=8, fpn_channels=16, min_size=(64,),
        max_size=96, test_min_size=64, test_max_size=96, fc_dim=32, rpn_pre_nms_topk=(200, 100),
        rpn_post_nms_topk=(100, 50), rpn_batch_size_per_image=64, roi_batch_size_per_image=32, detections_per_img=20,
        mask_conv_dim=16, mask_norm="GN", semantic_conv_dims=16)
    return spec.replace(**overrides) if overrides else spec


def tiny_mask_rcnn(**overrides) -> MaskRCNN:
    return build_mask_rcnn(tiny_spec(**overrides))


def tiny_semantic_fpn(**overrides) -> SemanticFPN:
    return build_semantic_fpn(tiny_spec(**overrides))


def tiny_panoptic_fpn(with_masks: bool = False, **overrides) -> PanopticFPN:
    """Panoptic FPN's semantic loss weight (0.5) unless overridden."""
    return build_panoptic_fpn(tiny_spec(**{"semantic_loss_weight": 0.5, **overrides}), with_masks=with_masks)


def rect_target(h: int, w: int, rects: list[tuple[int, int, int, int, int]]) -> dict[str, torch.Tensor]:
    """Target of an `h x w` image with filled rectangles `(x1, y1, x2, y2, label)` (pixel edges): boxes,
    labels, uint8 masks and the int64 semantic map (later rectangles on top)."""
    masks = torch.zeros((len(rects), h, w), dtype=torch.uint8)
    sem = torch.zeros((h, w), dtype=torch.int64)
    for k, (x1, y1, x2, y2, label) in enumerate(rects):
        masks[k, y1:y2, x1:x2] = 1
        sem[y1:y2, x1:x2] = label
    boxes = torch.tensor([r[:4] for r in rects], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([r[4] for r in rects], dtype=torch.int64)
    return {"boxes": boxes, "labels": labels, "masks": masks, "sem_seg": sem}


def toy_batch(empty: bool = False) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of different sizes (both resized by the tiny models); `empty`: no objects at all."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 72, 96, generator=g), torch.rand(3, 100, 80, generator=g)]
    if empty:
        return images, [rect_target(72, 96, []), rect_target(100, 80, [])]
    return images, [rect_target(72, 96, [(10, 8, 50, 40, 1), (40, 30, 90, 70, 3)]),
                    rect_target(100, 80, [(5, 50, 60, 95, 2)])]

"""Segmentation heads on top of the detector: Mask R-CNN instance masks and a semantic FPN head.

Importing this package registers the tasks "instance" (Mask R-CNN: COCO bbox + segm AP), "semantic"
(semantic FPN: mean IoU) and "panoptic_fpn" (Faster R-CNN + semantic head: COCO bbox AP + mean IoU)
with `detection.engine.launch`, so `tools/train.py` and `tools/eval.py` accept them as `model.task`.
"""

from __future__ import annotations

from detection.convert import load_detector_weights, load_torchvision_detector
from detection.engine.launch import TASKS, Task, register_task
from detection.specs import MaskSpec, ModelSpec, SemanticSpec

from .build import build_instance_model, build_panoptic_model, build_semantic_model
from .mask_head import MaskRCNNHead, MaskRoIHeads, crop_mask_targets, mask_loss, paste_masks_in_image
from .models import (
    MaskRCNN,
    PanopticFPN,
    SemanticFPN,
    build_mask_head,
    build_mask_rcnn,
    build_panoptic_fpn,
    build_semantic_fpn,
    build_semantic_head,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
    torchvision_mask_spec,
)
from .semantic_head import SemanticFPNHead, semantic_inference, semantic_loss

__all__ = [
    "MaskRCNN",
    "MaskRCNNHead",
    "MaskRoIHeads",
    "MaskSpec",
    "ModelSpec",
    "PanopticFPN",
    "SemanticFPN",
    "SemanticFPNHead",
    "SemanticSpec",
    "build_instance_model",
    "build_mask_head",
    "build_mask_rcnn",
    "build_panoptic_fpn",
    "build_panoptic_model",
    "build_semantic_fpn",
    "build_semantic_head",
    "build_semantic_model",
    "crop_mask_targets",
    "load_detector_weights",
    "load_torchvision_detector",
    "mask_loss",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "paste_masks_in_image",
    "semantic_inference",
    "semantic_loss",
    "torchvision_mask_spec",
]

SEGMENTATION_TASKS = (
    Task("instance", build_instance_model, with_masks=True, iou_types=("bbox", "segm")),
    Task("semantic", build_semantic_model, with_semantic=True, iou_types=(), semantic=True),
    Task("panoptic_fpn", build_panoptic_model, with_semantic=True, iou_types=("bbox",), semantic=True),
)
for _task in SEGMENTATION_TASKS:
    if _task.name not in TASKS:  # importing twice (e.g. a reload) must not fail
        register_task(_task)

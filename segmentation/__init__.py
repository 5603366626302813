"""Segmentation heads on top of the detector: Mask R-CNN instance masks and a semantic FPN head.

Importing this package loads the model layer only; the tasks "instance" (Mask R-CNN: COCO bbox +
segm AP), "semantic" (semantic FPN: mean IoU) and "panoptic_fpn" (Faster R-CNN + semantic head) are
declared in `resnet_det.tasks.segmentation`, which only the command line and the tests import.
"""

from __future__ import annotations

from detection.convert import load_detector_weights, load_torchvision_detector
from detection.specs import MaskSpec, ModelSpec, SemanticSpec

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
    "build_mask_head",
    "build_mask_rcnn",
    "build_panoptic_fpn",
    "build_semantic_fpn",
    "build_semantic_head",
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

"""The task registry's model builders for the segmentation tasks: `build_model(model_section,
num_foreground_classes)`, where `model_section` is the config's `model` section, a `ModelSpec`."""

from __future__ import annotations

from detection.specs import ModelSpec

from .models import MaskRCNN, PanopticFPN, SemanticFPN, build_mask_rcnn, build_panoptic_fpn, build_semantic_fpn

__all__ = ["build_instance_model", "build_panoptic_model", "build_semantic_model"]


def build_instance_model(spec: ModelSpec, num_classes: int) -> MaskRCNN:
    """Task "instance": Mask R-CNN for `num_classes` foreground classes."""
    return build_mask_rcnn(spec.replace(num_classes=num_classes))


def build_semantic_model(spec: ModelSpec, num_classes: int) -> SemanticFPN:
    """Task "semantic": semantic FPN for background + `num_classes` classes."""
    return build_semantic_fpn(spec.replace(num_classes=num_classes))


def build_panoptic_model(spec: ModelSpec, num_classes: int) -> PanopticFPN:
    """Task "panoptic_fpn": Faster R-CNN + semantic head (background + `num_classes`), the semantic loss
    weighted by `semantic.loss_weight`."""
    return build_panoptic_fpn(spec.replace(num_classes=num_classes))

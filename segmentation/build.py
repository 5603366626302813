"""Models of the segmentation tasks from a `ModelConfig` (what the task registry calls)."""

from __future__ import annotations

from detection.build import spec_from_config
from detection.config import ModelConfig

from .models import (
    MaskHeadSpec,
    MaskRCNN,
    PanopticFPN,
    SemanticFPN,
    SemanticHeadSpec,
    build_mask_rcnn,
    build_panoptic_fpn,
    build_semantic_fpn,
)

__all__ = ["build_instance_model", "build_panoptic_model", "build_semantic_model", "mask_spec_from_config",
           "semantic_spec_from_config"]


def mask_spec_from_config(cfg: ModelConfig) -> MaskHeadSpec:
    """`model.mask_head_*` / `model.mask_pooler_resolution` -> `MaskHeadSpec`."""
    return MaskHeadSpec(num_convs=cfg.mask_head_convs, conv_dim=cfg.mask_head_conv_dim, norm=cfg.mask_head_norm,
                        pooler_resolution=cfg.mask_pooler_resolution, sampling_ratio=cfg.roi.sampling_ratio)


def semantic_spec_from_config(cfg: ModelConfig, *, loss_weight: float = 1.0) -> SemanticHeadSpec:
    """`model.semantic_*` -> `SemanticHeadSpec`."""
    return SemanticHeadSpec(conv_dims=cfg.semantic_conv_dims, norm=cfg.semantic_norm,
                            ignore_index=cfg.semantic_ignore_index, loss_weight=loss_weight)


def build_instance_model(cfg: ModelConfig, num_classes: int) -> MaskRCNN:
    """Task "instance": Mask R-CNN for `num_classes` foreground classes."""
    return build_mask_rcnn(spec_from_config(cfg, num_classes), mask_spec_from_config(cfg))


def build_semantic_model(cfg: ModelConfig, num_classes: int) -> SemanticFPN:
    """Task "semantic": backbone + FPN + semantic head for background + `num_classes` classes (the loss is
    not weighted: `model.semantic_loss_weight` is the panoptic_fpn balance)."""
    return build_semantic_fpn(spec_from_config(cfg, num_classes), semantic_spec_from_config(cfg))


def build_panoptic_model(cfg: ModelConfig, num_classes: int) -> PanopticFPN:
    """Task "panoptic_fpn": Faster R-CNN + semantic head (background + `num_classes`), the semantic loss
    weighted by `model.semantic_loss_weight`."""
    return build_panoptic_fpn(spec_from_config(cfg, num_classes), semantic_spec_from_config(cfg),
                              semantic_loss_weight=cfg.semantic_loss_weight)

"""Build a detector from a `ModelConfig` (the only place that reads config objects for models)."""

from __future__ import annotations

from .config import ModelConfig
from .faster_rcnn import FasterRCNN
from .models import FasterRCNNSpec, build_faster_rcnn


def spec_from_config(cfg: ModelConfig, num_classes: int) -> FasterRCNNSpec:
    """Translate `model.*` settings into a `FasterRCNNSpec`.

    Args:
        cfg: the model section of the config.
        num_classes: foreground classes (the spec counts the background too).
    """
    rpn, roi = cfg.rpn, cfg.roi
    anchor_sizes = rpn.anchor_sizes
    if cfg.arch == "c4" and len(anchor_sizes) > 1:
        # One feature level in C4: the configured per-level sizes become one level's sizes.
        anchor_sizes = (tuple(s for level in anchor_sizes for s in level),)
    return FasterRCNNSpec(
        backbone=cfg.backbone, arch=cfg.arch, num_classes=num_classes + 1, norm=cfg.norm, freeze_at=cfg.freeze_at,
        backbone_weights=cfg.backbone_weights,
        backbone_kwargs={"width": cfg.backbone_width} if cfg.backbone_width else {},
        fpn_channels=cfg.fpn_channels, fpn_norm=cfg.fpn_norm, anchor_sizes=anchor_sizes,
        aspect_ratios=rpn.aspect_ratios, rpn_conv_depth=rpn.conv_depth,
        rpn_pre_nms_topk=(rpn.pre_nms_topk_train, rpn.pre_nms_topk_test),
        rpn_post_nms_topk=(rpn.post_nms_topk_train, rpn.post_nms_topk_test), rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou=rpn.fg_iou, rpn_bg_iou=rpn.bg_iou, rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction, box_head=roi.box_head, fc_dim=roi.fc_dim, conv_dim=roi.conv_dim,
        num_convs=roi.num_convs, box_head_norm=roi.box_head_norm, pooler_resolution=roi.pooler_resolution,
        pooler_type=roi.pooler_type, sampling_ratio=roi.sampling_ratio,
        roi_batch_size_per_image=roi.batch_size_per_image, roi_positive_fraction=roi.positive_fraction,
        roi_fg_iou=roi.fg_iou, roi_bg_iou=roi.bg_iou, bbox_reg_weights=roi.bbox_reg_weights,
        score_thresh=roi.score_thresh, nms_thresh=roi.nms_thresh, detections_per_img=roi.detections_per_img,
        box_loss=cfg.box_loss, min_size=cfg.min_size, max_size=cfg.max_size, test_min_size=cfg.test_min_size,
        test_max_size=cfg.test_max_size,
    )


def build_detector(cfg: ModelConfig, num_classes: int) -> FasterRCNN:
    """The Faster R-CNN of `model.*` (task "detection")."""
    return build_faster_rcnn(spec_from_config(cfg, num_classes))

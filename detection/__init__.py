"""Faster R-CNN (FPN and C4) on the ResNet / VGG backbones, with torchvision's calling convention.

The public API: the model schema (`ModelSpec` and its sections), the builders, torchvision's
architectures under torchvision's names, and weight loading::

    import detection
    model = detection.fasterrcnn_resnet50_fpn(weights="COCO_V1").eval()      # torch's hub cache, verified
    model = detection.build_faster_rcnn(num_classes=80, backbone_name="resnet101", arch="c4")

Importing this package loads the model layer only (no trainer, datasets, evaluators or config loader).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resnet_det_common.lazy import lazy_exports

if TYPE_CHECKING:  # the names, for type checkers; at run time they are imported on first use
    from .convert import convert_torchvision_detection, load_detector_weights, load_torchvision_detector
    from .faster_rcnn import FasterRCNN
    from .models import (
        build_box_head,
        build_box_predictor,
        build_c4_trunk_and_head,
        build_faster_rcnn,
        build_fpn_backbone,
        build_preprocessor,
        build_roi_heads,
        build_rpn,
        build_trunk,
        fasterrcnn_resnet50_fpn,
        fasterrcnn_resnet50_fpn_v2,
        torchvision_spec,
    )
    from .preprocess import Preprocessor
    from .roi_heads import RoIHeads
    from .rpn import RPN
    from .specs import (
        BackboneSpec,
        FPNSpec,
        InputSpec,
        MaskSpec,
        ModelSpec,
        ROISpec,
        RPNSpec,
        SemanticSpec,
    )

__all__ = [
    "RPN",
    "BackboneSpec",
    "FPNSpec",
    "FasterRCNN",
    "InputSpec",
    "MaskSpec",
    "ModelSpec",
    "Preprocessor",
    "ROISpec",
    "RPNSpec",
    "RoIHeads",
    "SemanticSpec",
    "build_box_head",
    "build_box_predictor",
    "build_c4_trunk_and_head",
    "build_faster_rcnn",
    "build_fpn_backbone",
    "build_preprocessor",
    "build_roi_heads",
    "build_rpn",
    "build_trunk",
    "convert_torchvision_detection",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "load_detector_weights",
    "load_torchvision_detector",
    "torchvision_spec",
]

# Lazy (resnet_det_common.lazy): importing this package loads none of its submodules until a name is used.
__getattr__, __dir__ = lazy_exports(__name__, {
    "convert_torchvision_detection": ".convert",
    "load_detector_weights": ".convert",
    "load_torchvision_detector": ".convert",
    "FasterRCNN": ".faster_rcnn",
    "build_box_head": ".models",
    "build_box_predictor": ".models",
    "build_c4_trunk_and_head": ".models",
    "build_faster_rcnn": ".models",
    "build_fpn_backbone": ".models",
    "build_preprocessor": ".models",
    "build_roi_heads": ".models",
    "build_rpn": ".models",
    "build_trunk": ".models",
    "fasterrcnn_resnet50_fpn": ".models",
    "fasterrcnn_resnet50_fpn_v2": ".models",
    "torchvision_spec": ".models",
    "Preprocessor": ".preprocess",
    "RoIHeads": ".roi_heads",
    "RPN": ".rpn",
    "BackboneSpec": ".specs",
    "FPNSpec": ".specs",
    "InputSpec": ".specs",
    "MaskSpec": ".specs",
    "ModelSpec": ".specs",
    "ROISpec": ".specs",
    "RPNSpec": ".specs",
    "SemanticSpec": ".specs",
})

"""Builders for Faster R-CNN (FPN and C4) on any registered backbone, and torchvision presets.

Variants are data: `build_faster_rcnn(backbone="resnet101", arch="c4")` and
`build_faster_rcnn(backbone="vgg16", arch="c4")` differ in one argument, which is how the ResNet
paper's VGG-16 -> ResNet-101 swap is made.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

from torch import nn

from backbone import FPN, build_backbone
from backbone.base import Backbone
from backbone.layers import NormSpec, get_norm
from backbone.resnet import ResNet
from backbone.vgg import VGGFCHead
from backbone.weights import load_weights, resolve_imagenet_weights

from .anchors import AnchorGenerator
from .faster_rcnn import FasterRCNN
from .poolers import RoIPooler
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessor
from .roi_heads import ConvFCHead, Res5Head, RoIHeads, TwoMLPHead
from .rpn import RPN, RPNHead

FPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
C4_ANCHOR_SIZES = ((32, 64, 128, 256, 512),)


@dataclass
class FasterRCNNSpec:
    """Every architectural and inference setting of a Faster R-CNN, with torchvision/Detectron defaults."""

    backbone: str = "resnet50"
    arch: str = "fpn"  # "fpn" or "c4"
    num_classes: int = 91  # including background
    norm: NormSpec = "FrozenBN"
    freeze_at: int = 2
    backbone_weights: str | None = None  # None, "imagenet" or a file
    backbone_kwargs: dict = field(default_factory=dict)  # e.g. {"width": 8} for tiny test models
    fpn_channels: int = 256
    fpn_norm: NormSpec = "none"
    anchor_sizes: tuple[tuple[float, ...], ...] | None = None  # None: FPN or C4 default
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_conv_depth: int = 1
    rpn_pre_nms_topk: tuple[int, int] = (2000, 1000)
    rpn_post_nms_topk: tuple[int, int] = (2000, 1000)
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    box_head: str = "2fc"  # "2fc", "4conv1fc" (FPN); C4 uses res5 or VGG fc6/fc7
    fc_dim: int = 1024
    conv_dim: int = 256
    num_convs: int = 4
    box_head_norm: NormSpec = "BN"
    pooler_resolution: int | None = None  # None: 7 (FPN, VGG C4), 14 (ResNet C4)
    pooler_type: str = "roi_align"
    sampling_ratio: int = 2
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_fg_iou: float = 0.5
    roi_bg_iou: float = 0.5
    bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    box_loss: str = "smooth_l1"
    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    test_min_size: int = 800
    test_max_size: int = 1333
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    torchvision_anchor_strides: bool = False  # see AnchorGenerator; True in the torchvision presets

    def replace(self, **kwargs) -> FasterRCNNSpec:
        names = {f.name for f in fields(self)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown Faster R-CNN setting(s) {unknown}; valid: {sorted(names)}")
        return replace(self, **kwargs)


def _load_trunk_weights(trunk: Backbone, arch: str, weights: str | os.PathLike | None) -> None:
    if weights is None:
        return
    path = resolve_imagenet_weights(arch) if weights == "imagenet" else weights
    load_weights(trunk, path, strict=True)


def _c4_feature(trunk: Backbone) -> str:
    names = [n for n, s in trunk._out_feature_shapes.items() if s.stride == 16 and n != "stem"]
    if not names:
        raise ValueError(f"{type(trunk).__name__} has no stride-16 output for a C4 detector")
    return names[-1]


def build_faster_rcnn(spec: FasterRCNNSpec | None = None, *, backbone_module: Backbone | None = None,
                      **overrides) -> FasterRCNN:
    """Build a Faster R-CNN from a spec (defaults: torchvision's R50-FPN), e.g.
    `build_faster_rcnn(backbone="resnet101", arch="c4", num_classes=81)`.

    `backbone_module` puts any `Backbone` whose outputs share one channel count (an FPN of ours, a
    `backbone.from_torchvision(...)` or `TimmBackbone` + FPN) under the FPN-style heads instead of
    building one from `spec.backbone`; the heads read its `output_shape()`.
    """
    spec = (spec or FasterRCNNSpec()).replace(**overrides) if overrides else (spec or FasterRCNNSpec())
    if spec.arch not in ("fpn", "c4"):
        raise ValueError(f"arch={spec.arch!r}; use 'fpn' or 'c4'")
    if spec.num_classes < 2:
        raise ValueError(f"num_classes={spec.num_classes} must include the background (>= 2)")
    is_vgg = spec.backbone.startswith("vgg")
    kwargs = dict(norm="none" if is_vgg and spec.norm in ("FrozenBN", "BN") and spec.backbone == "vgg16" else spec.norm,
                  freeze_at=spec.freeze_at, **spec.backbone_kwargs)
    if spec.arch == "fpn":
        if backbone_module is not None:
            backbone: Backbone = backbone_module
            channels = {s.channels for s in backbone.output_shape().values()}
            if len(channels) != 1:
                raise ValueError(f"backbone_module outputs must share one channel count for the FPN heads, got "
                                 f"{ {k: s.channels for k, s in backbone.output_shape().items()} }")
            in_ch = channels.pop()
        else:
            trunk = build_backbone(spec.backbone, **kwargs)
            _load_trunk_weights(trunk, spec.backbone, spec.backbone_weights)
            backbone = FPN(trunk, out_channels=spec.fpn_channels, norm=spec.fpn_norm, top_block="maxpool")
            in_ch = spec.fpn_channels
        shapes = backbone.output_shape()
        rpn_features = tuple(shapes)
        # RoIs are pooled from the first four levels (P2-P5); a fifth (P6) serves the RPN only.
        roi_features = rpn_features[:4]
        anchor_sizes = spec.anchor_sizes or FPN_ANCHOR_SIZES[: len(rpn_features)]
        resolution = spec.pooler_resolution or 7
        if spec.box_head == "2fc":
            box_head: nn.Module = TwoMLPHead(in_ch, resolution, spec.fc_dim)
        elif spec.box_head == "4conv1fc":
            box_head = ConvFCHead(in_ch, resolution, num_convs=spec.num_convs, conv_dim=spec.conv_dim,
                                  fc_dim=spec.fc_dim, norm=spec.box_head_norm)
        else:
            raise ValueError(f"box_head={spec.box_head!r}; use '2fc' or '4conv1fc' for FPN models")
    else:
        if is_vgg:
            trunk = build_backbone(spec.backbone, out_features=("conv5",), **kwargs)
            _load_trunk_weights(trunk, spec.backbone, spec.backbone_weights)
            resolution = spec.pooler_resolution or 7
            box_head = VGGFCHead(trunk.output_shape()["conv5"].channels, resolution, hidden=4096)
            if spec.backbone_weights is not None:
                _load_vgg_fc(box_head, spec.backbone, spec.backbone_weights)
        else:
            trunk = build_backbone(spec.backbone, out_features=("res4", "res5"), **kwargs)
            if not isinstance(trunk, ResNet):
                raise ValueError(f"C4 needs a ResNet or VGG trunk, got {spec.backbone!r}")
            _load_trunk_weights(trunk, spec.backbone, spec.backbone_weights)
            out_ch = trunk.output_shape()["res5"].channels
            _, res5 = trunk.pop_last_stage()
            head_norm = None
            if trunk.preact:
                head_norm = get_norm(spec.norm, out_ch)
                if spec.backbone_weights is not None:
                    _load_head_norm(head_norm, spec.backbone, spec.backbone_weights)
            box_head = Res5Head(res5, out_ch, head_norm)
            resolution = spec.pooler_resolution or 14
        backbone = trunk
        feature = _c4_feature(trunk)
        rpn_features = roi_features = (feature,)
        anchor_sizes = spec.anchor_sizes or C4_ANCHOR_SIZES
        in_ch = trunk.output_shape()[feature].channels
    shapes = backbone.output_shape()
    anchors = AnchorGenerator(anchor_sizes, spec.aspect_ratios, [shapes[f].stride for f in rpn_features],
                              torchvision_strides=spec.torchvision_anchor_strides)
    rpn = RPN(rpn_features, RPNHead(in_ch, anchors.num_anchors_per_location[0], spec.rpn_conv_depth), anchors,
              pre_nms_topk=spec.rpn_pre_nms_topk, post_nms_topk=spec.rpn_post_nms_topk,
              nms_thresh=spec.rpn_nms_thresh, fg_iou=spec.rpn_fg_iou, bg_iou=spec.rpn_bg_iou,
              batch_size_per_image=spec.rpn_batch_size_per_image, positive_fraction=spec.rpn_positive_fraction,
              box_loss=spec.box_loss)
    pooler = RoIPooler([shapes[f].stride for f in roi_features], resolution, sampling_ratio=spec.sampling_ratio,
                       pooler_type=spec.pooler_type)
    roi_heads = RoIHeads(roi_features, pooler, box_head, spec.num_classes, fg_iou=spec.roi_fg_iou,
                         bg_iou=spec.roi_bg_iou, batch_size_per_image=spec.roi_batch_size_per_image,
                         positive_fraction=spec.roi_positive_fraction, bbox_reg_weights=spec.bbox_reg_weights,
                         score_thresh=spec.score_thresh, nms_thresh=spec.nms_thresh,
                         detections_per_img=spec.detections_per_img, box_loss=spec.box_loss)
    preprocessor = Preprocessor(min_size=spec.min_size, max_size=spec.max_size, test_min_size=spec.test_min_size,
                                test_max_size=spec.test_max_size, pixel_mean=spec.pixel_mean,
                                pixel_std=spec.pixel_std, size_divisibility=max(32, backbone.size_divisibility))
    model = FasterRCNN(backbone, rpn, roi_heads, preprocessor)
    model.spec = spec
    return model


def _classifier_state(arch: str, weights: str | os.PathLike) -> dict:
    from backbone.weights import read_state_dict, to_classifier_layout

    path = resolve_imagenet_weights(arch) if weights == "imagenet" else weights
    return to_classifier_layout(read_state_dict(path))[0]


def _load_vgg_fc(head: VGGFCHead, arch: str, weights: str | os.PathLike) -> None:
    sd = _classifier_state(arch, weights)
    sub = {k[len("fc_head."):]: v for k, v in sd.items() if k.startswith("fc_head.")}
    if sub:  # fc6/fc7 exist in ImageNet classifiers; a trunk-only file leaves them random
        head.load_state_dict(sub, strict=True)


def _load_head_norm(norm: nn.Module, arch: str, weights: str | os.PathLike) -> None:
    sd = _classifier_state(arch, weights)
    sub = {k[len("head_norm."):]: v for k, v in sd.items() if k.startswith("head_norm.")}
    if sub:
        norm.load_state_dict(sub, strict=False)


# ------------------------------------------------------------------------------------------ presets
def torchvision_spec(name: str = "fasterrcnn_resnet50_fpn", *, num_classes: int = 91) -> FasterRCNNSpec:
    """Spec reproducing a torchvision detection architecture and its inference settings.

    Supported: `fasterrcnn_resnet50_fpn`, `fasterrcnn_resnet50_fpn_v2`. Load their weights with
    `detection.convert.load_torchvision_detector`.
    """
    base = FasterRCNNSpec(backbone="resnet50", arch="fpn", num_classes=num_classes, norm="FrozenBN", freeze_at=0,
                          torchvision_anchor_strides=True)
    if name == "fasterrcnn_resnet50_fpn":
        return base
    if name == "fasterrcnn_resnet50_fpn_v2":
        return base.replace(norm="BN", fpn_norm="BN", rpn_conv_depth=2, box_head="4conv1fc", box_head_norm="BN")
    raise ValueError(f"unknown torchvision preset {name!r}; use 'fasterrcnn_resnet50_fpn' or "
                     "'fasterrcnn_resnet50_fpn_v2'")


def spec_from_sequence(values: Sequence) -> tuple:
    return tuple(values)

"""Mask R-CNN, Panoptic-FPN-style multi-task R-CNN and a semantic FPN, with builders and torchvision presets.

All follow torchvision's calling convention: `model(images, targets)` returns a dict of losses in
training, `model(images)` one dict per image in eval. Images are float `[3, H, W]` RGB in `[0, 1]`;
every output is at the size of its input image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Self

import torch
from torch import Tensor, nn

from backbone import FPN, build_backbone
from backbone.base import Backbone
from backbone.layers import NormSpec
from backbone.weights import load_weights, resolve_imagenet_weights
from detection.faster_rcnn import FasterRCNN
from detection.models import FasterRCNNSpec, build_faster_rcnn, torchvision_spec
from detection.poolers import RoIPooler
from detection.preprocess import Preprocessor, check_images, check_targets
from detection.roi_heads import RoIHeads
from detection.rpn import RPN

from .mask_head import MaskRCNNHead, MaskRoIHeads, paste_masks_in_image
from .semantic_head import (
    SemanticFPNHead,
    check_semantic_targets,
    prepare_semantic_targets,
    semantic_inference,
    semantic_loss,
)

__all__ = ["MaskHeadSpec", "MaskRCNN", "PanopticFPN", "SemanticFPN", "SemanticHeadSpec", "build_mask_rcnn",
           "build_panoptic_fpn", "build_semantic_fpn", "torchvision_mask_spec"]


class _Spec:
    def replace(self, **kwargs: object) -> Self:
        """A copy with `kwargs` changed; an unknown name raises `ValueError` listing the valid ones."""
        names = {f.name for f in fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} setting(s) {unknown}; valid: {sorted(names)}")
        return replace(self, **kwargs)  # type: ignore[type-var]


@dataclass
class MaskHeadSpec(_Spec):
    """Mask branch settings (the paper's / torchvision's defaults)."""

    num_convs: int = 4
    conv_dim: int = 256
    norm: NormSpec = "none"  # "BN" in torchvision's v2
    pooler_resolution: int = 14  # masks are twice this
    sampling_ratio: int = 2


@dataclass
class SemanticHeadSpec(_Spec):
    """Semantic FPN head settings (Panoptic FPN's defaults)."""

    conv_dims: int = 128
    norm: NormSpec = "GN"
    common_stride: int = 4
    in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5")
    ignore_index: int = 255
    loss_weight: float = 1.0


def _check_masks_present(targets: Sequence[dict[str, Tensor]] | None) -> None:
    if not isinstance(targets, list | tuple):
        return  # check_targets reports it
    for i, t in enumerate(targets):
        if isinstance(t, dict) and "masks" not in t:
            raise ValueError(f"targets[{i}] has no 'masks' (keys: {sorted(t)}); Mask R-CNN trains on instance masks: "
                             "uint8 [K, H, W], one per box, at the image's size (build the dataset with "
                             "with_masks=True)")


class MaskRCNN(FasterRCNN):
    """Faster R-CNN with a mask branch (`roi_heads` is a `MaskRoIHeads`).

    - training: targets also hold `masks` (uint8 `[K, H, W]`, one per box, at the image's size); the
      losses add `loss_mask`.
    - eval: each image's dict also holds `masks`, float `[D, 1, H, W]` probabilities pasted into the
      image at its own size (threshold at 0.5 for binary masks), like torchvision.
    """

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and isinstance(self.roi_heads, MaskRoIHeads):
            _check_masks_present(targets)
        return super().forward(images, targets)

    @staticmethod
    def postprocess(detections: list[dict[str, Tensor]], sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Boxes back to each input image's coordinates, then masks pasted at those boxes and sizes."""
        detections = FasterRCNN.postprocess(detections, sizes, original_sizes)
        for det, o in zip(detections, original_sizes):
            if "masks" in det:
                det["masks"] = paste_masks_in_image(det["masks"], det["boxes"], o)
        return detections


class PanopticFPN(MaskRCNN):
    """An R-CNN (Faster or Mask, by `roi_heads`) and a semantic FPN head on the same FPN, trained jointly.

    - training: targets also hold `sem_seg` (int64 `[H, W]` at the image's size, `ignore_index` = not
      labelled); the losses add `loss_sem_seg` multiplied by `semantic_loss_weight`.
    - eval: each image's dict also holds `sem_seg`, int64 `[H, W]` labels at the image's size.

    Args:
        backbone / rpn / roi_heads / preprocessor: as in `FasterRCNN`.
        semantic_head: a `SemanticFPNHead` on the backbone's outputs.
        semantic_loss_weight: weight of the semantic loss in the sum (0.5 in Panoptic FPN).
        ignore_index: label the semantic loss ignores (255).
    """

    def __init__(self, backbone: Backbone, rpn: RPN, roi_heads: RoIHeads, preprocessor: Preprocessor,
                 semantic_head: SemanticFPNHead, *, semantic_loss_weight: float = 0.5, ignore_index: int = 255) -> None:
        super().__init__(backbone, rpn, roi_heads, preprocessor)
        self.semantic_head = semantic_head
        self.semantic_loss_weight = semantic_loss_weight
        self.ignore_index = ignore_index

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        check_images(images)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        if self.training:
            check_targets(targets, len(images), self.num_classes, original_sizes)
            check_semantic_targets(targets, original_sizes, self.semantic_head.num_classes, self.ignore_index)
            if isinstance(self.roi_heads, MaskRoIHeads):
                _check_masks_present(targets)
        batch, sizes, _ = self.preprocessor(images)
        image_sizes = torch.tensor(sizes, device=batch.device)
        gt = self.prepare_targets(targets, original_sizes, sizes, batch.device) if self.training else None
        features = self.backbone(batch)
        proposals, valid, rpn_losses = self.rpn(features, image_sizes, gt, tuple(batch.shape[-2:]))
        detections, roi_losses = self.roi_heads(features, proposals, valid, image_sizes, gt)
        sem_logits = self.semantic_head(features)
        if self.training:
            assert targets is not None
            sem_targets = prepare_semantic_targets(targets, sizes, original_sizes, tuple(batch.shape[-2:]),
                                                   self.ignore_index, batch.device)
            loss = semantic_loss(sem_logits, sem_targets, self.ignore_index)
            return {**rpn_losses, **roi_losses, "loss_sem_seg": loss * self.semantic_loss_weight}
        results = self.postprocess(detections, sizes, original_sizes)
        for r, sem in zip(results, semantic_inference(sem_logits, sizes, original_sizes)):
            r["sem_seg"] = sem
        return results


class SemanticFPN(nn.Module):
    """Semantic segmentation: backbone + FPN + `SemanticFPNHead`.

    - training: `model(images, targets)` with `targets[i]["sem_seg"]` int64 `[H, W]` at the image's
      size -> `{"loss_sem_seg": ...}` (times `loss_weight`).
    - eval: `model(images)` -> `[{"sem_seg": int64 [H, W]}, ...]` at each image's size.

    Args:
        backbone: an FPN (or any backbone with the head's `in_features`).
        semantic_head: the head.
        preprocessor: resizing, normalisation and batching (the detectors').
        loss_weight: multiplies the loss.
        ignore_index: label the loss ignores (255).
    """

    def __init__(self, backbone: Backbone, semantic_head: SemanticFPNHead, preprocessor: Preprocessor, *,
                 loss_weight: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__()
        self.backbone = backbone
        self.semantic_head = semantic_head
        self.preprocessor = preprocessor
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index

    @property
    def num_classes(self) -> int:
        """Semantic classes, background included."""
        return self.semantic_head.num_classes

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        check_images(images)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        if self.training:
            check_semantic_targets(targets, original_sizes, self.num_classes, self.ignore_index)  # type: ignore[arg-type]
        batch, sizes, _ = self.preprocessor(images)
        logits = self.semantic_head(self.backbone(batch))
        if self.training:
            assert targets is not None
            sem_targets = prepare_semantic_targets(targets, sizes, original_sizes, tuple(batch.shape[-2:]),
                                                   self.ignore_index, batch.device)
            return {"loss_sem_seg": semantic_loss(logits, sem_targets, self.ignore_index) * self.loss_weight}
        return [{"sem_seg": s} for s in semantic_inference(logits, sizes, original_sizes)]


# ----------------------------------------------------------------------------------------- builders
def _mask_branch(model: FasterRCNN, spec: FasterRCNNSpec, mask: MaskHeadSpec) -> MaskRoIHeads:
    if spec.arch != "fpn":
        raise ValueError(f"arch={spec.arch!r}: the mask head is built for FPN detectors; use arch='fpn'")
    shapes = model.backbone.output_shape()
    roi = model.roi_heads
    pooler = RoIPooler([shapes[f].stride for f in roi.in_features], mask.pooler_resolution,
                       sampling_ratio=mask.sampling_ratio, pooler_type=spec.pooler_type)
    head = MaskRCNNHead(spec.fpn_channels, spec.num_classes, num_convs=mask.num_convs, conv_dim=mask.conv_dim,
                        norm=mask.norm)
    return MaskRoIHeads.from_box_heads(roi, pooler, head)


def build_mask_rcnn(detector: FasterRCNNSpec | None = None, mask: MaskHeadSpec | None = None,
                    **overrides: object) -> MaskRCNN:
    """Mask R-CNN: the Faster R-CNN of `detector` (+ `overrides`) with a mask branch, e.g.
    `build_mask_rcnn(*torchvision_mask_spec("maskrcnn_resnet50_fpn"))` or
    `build_mask_rcnn(num_classes=5, backbone_kwargs={"width": 8})`."""
    spec = (detector or FasterRCNNSpec()).replace(**overrides) if overrides else (detector or FasterRCNNSpec())
    base = build_faster_rcnn(spec)
    model = MaskRCNN(base.backbone, base.rpn, _mask_branch(base, spec, mask or MaskHeadSpec()), base.preprocessor)
    model.spec = spec
    return model


def _semantic_head(backbone: Backbone, in_channels: int, num_classes: int, semantic: SemanticHeadSpec
                   ) -> SemanticFPNHead:
    shapes = backbone.output_shape()
    missing = [f for f in semantic.in_features if f not in shapes]
    if missing:
        raise ValueError(f"the semantic head reads {list(semantic.in_features)} but the backbone gives "
                         f"{list(shapes)}; set SemanticHeadSpec.in_features")
    return SemanticFPNHead(semantic.in_features, [shapes[f].stride for f in semantic.in_features], in_channels,
                           num_classes, conv_dims=semantic.conv_dims, common_stride=semantic.common_stride,
                           norm=semantic.norm)


def build_panoptic_fpn(detector: FasterRCNNSpec | None = None, semantic: SemanticHeadSpec | None = None, *,
                       mask: MaskHeadSpec | None = None, semantic_loss_weight: float = 0.5) -> PanopticFPN:
    """Faster R-CNN (or Mask R-CNN when `mask` is given) + a semantic FPN head on the same FPN.

    The semantic head predicts `detector.num_classes` classes (background + the detector's classes: the
    labels a COCO-style dataset paints from its instances, or a semantic PNG with the same labels).
    """
    spec = detector or FasterRCNNSpec()
    semantic = semantic or SemanticHeadSpec()
    base = build_faster_rcnn(spec)
    roi_heads = _mask_branch(base, spec, mask) if mask is not None else base.roi_heads
    head = _semantic_head(base.backbone, spec.fpn_channels, spec.num_classes, semantic)
    model = PanopticFPN(base.backbone, base.rpn, roi_heads, base.preprocessor, head,
                        semantic_loss_weight=semantic_loss_weight, ignore_index=semantic.ignore_index)
    model.spec = spec
    return model


def _load_trunk(trunk: Backbone, arch: str, weights: str | os.PathLike | None) -> None:
    if weights is not None:
        load_weights(trunk, resolve_imagenet_weights(arch) if weights == "imagenet" else weights, strict=True)


def build_semantic_fpn(spec: FasterRCNNSpec | None = None, semantic: SemanticHeadSpec | None = None) -> SemanticFPN:
    """Backbone + FPN + semantic head. The backbone, FPN and input-size fields of `spec` are used (the
    detector heads' are not); `spec.num_classes` counts the semantic classes, background included."""
    spec = spec or FasterRCNNSpec()
    semantic = semantic or SemanticHeadSpec()
    if spec.num_classes < 2:
        raise ValueError(f"num_classes={spec.num_classes} must count the background too (>= 2)")
    trunk = build_backbone(spec.backbone, norm=spec.norm, freeze_at=spec.freeze_at, **spec.backbone_kwargs)
    _load_trunk(trunk, spec.backbone, spec.backbone_weights)
    # No P6: the semantic head reads P2..P5 only (a parameter-free max pool would be wasted work).
    backbone = FPN(trunk, out_channels=spec.fpn_channels, norm=spec.fpn_norm, top_block="none")
    head = _semantic_head(backbone, spec.fpn_channels, spec.num_classes, semantic)
    preprocessor = Preprocessor(min_size=spec.min_size, max_size=spec.max_size, test_min_size=spec.test_min_size,
                                test_max_size=spec.test_max_size, pixel_mean=spec.pixel_mean,
                                pixel_std=spec.pixel_std, size_divisibility=max(32, backbone.size_divisibility))
    model = SemanticFPN(backbone, head, preprocessor, loss_weight=semantic.loss_weight,
                        ignore_index=semantic.ignore_index)
    model.spec = spec
    return model


def torchvision_mask_spec(name: str = "maskrcnn_resnet50_fpn", *, num_classes: int = 91
                          ) -> tuple[FasterRCNNSpec, MaskHeadSpec]:
    """Specs reproducing torchvision's `maskrcnn_resnet50_fpn` or `maskrcnn_resnet50_fpn_v2` (load their
    weights with `detection.convert.load_torchvision_detector`): `build_mask_rcnn(*torchvision_mask_spec(name))`.
    """
    if name == "maskrcnn_resnet50_fpn":
        return torchvision_spec("fasterrcnn_resnet50_fpn", num_classes=num_classes), MaskHeadSpec()
    if name == "maskrcnn_resnet50_fpn_v2":
        return torchvision_spec("fasterrcnn_resnet50_fpn_v2", num_classes=num_classes), MaskHeadSpec(norm="BN")
    raise ValueError(f"unknown torchvision preset {name!r}; use 'maskrcnn_resnet50_fpn' or "
                     "'maskrcnn_resnet50_fpn_v2'")

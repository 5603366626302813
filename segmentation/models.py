"""Mask R-CNN, Panoptic-FPN-style multi-task R-CNN and a semantic FPN, with builders and torchvision presets.

All follow torchvision's calling convention: `model(images, targets)` returns a dict of losses in
training, `model(images)` one dict per image in eval. Images are float `[3, H, W]` RGB in `[0, 1]`;
every output is at the size of its input image.

Builders read one `detection.specs.ModelSpec` (its `mask` and `semantic` sections for the heads here) and
take every head's in-channels and strides from the `output_shape()` of the FPN that feeds it:
`build_mask_rcnn`, `build_panoptic_fpn`, `build_semantic_fpn`; `maskrcnn_resnet50_fpn(_v2)` are
torchvision's architectures under torchvision's names, with its weights from a file or its weight enums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from backbone.base import Backbone
from backbone.shape_spec import ShapeSpec
from detection.faster_rcnn import FasterRCNN
from detection.models import (
    build_box_head,
    build_box_predictor,
    build_fpn_backbone,
    build_preprocessor,
    build_roi_heads,
    build_rpn,
    build_torchvision_detector,
    load_model_weights,
    pooled_features,
    resolve_spec,
    torchvision_spec,
)
from detection.poolers import RoIPooler
from detection.preprocess import Preprocessor, check_images, check_targets
from detection.roi_heads import RoIHeads
from detection.rpn import RPN
from detection.specs import MaskSpec, ModelSpec

from .mask_head import MaskRCNNHead, MaskRoIHeads, paste_masks_in_image
from .semantic_head import (
    SemanticFPNHead,
    check_semantic_targets,
    prepare_semantic_targets,
    semantic_inference,
    semantic_loss,
)

__all__ = ["MaskRCNN", "PanopticFPN", "SemanticFPN", "build_mask_head", "build_mask_rcnn", "build_panoptic_fpn",
           "build_semantic_fpn", "build_semantic_head", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
           "torchvision_mask_spec"]


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

    def __prepare_scriptable__(self) -> nn.Module:
        """`torch.jit.script(model)` scripts this instead: `FasterRCNN.__prepare_scriptable__`'s inference module
        with this model's mask pooler and mask head (`detection.torchscript`)."""
        from detection.torchscript import check_forward, scriptable_detector

        check_forward(self, MaskRCNN)
        heads = self.roi_heads
        if type(heads) is not MaskRoIHeads:
            raise ValueError(f"torch.jit.script({type(self).__name__}): model.roi_heads is a {type(heads).__name__}, "
                             "not our MaskRoIHeads: only our own parts have a TorchScript equivalent here")
        return scriptable_detector(self, reproduces=MaskRCNN, mask=(heads.mask_pooler, heads.mask_head))

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

    def __prepare_scriptable__(self) -> nn.Module:
        """`torch.jit.script` of a semantic FPN is refused with this message (only the R-CNNs have a scriptable
        equivalent, `detection.torchscript`); its backbone scripts by itself."""
        raise ValueError("torch.jit.script(SemanticFPN): not supported (only Faster and Mask R-CNN have a "
                         "TorchScript path); script model.backbone, the FPN, and run the head eagerly")

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
def _require_fpn(spec: ModelSpec, what: str) -> None:
    if spec.arch != "fpn":
        raise ValueError(f"arch={spec.arch!r}: the {what} is built on an FPN; use arch='fpn'")


def build_mask_head(spec: ModelSpec, input_shape: dict[str, ShapeSpec]) -> tuple[RoIPooler, MaskRCNNHead]:
    """The mask branch on the levels of `input_shape` (in-channels and pooler strides from the shapes):
    RoIAlign at `mask.pooler_resolution` (`roi.sampling_ratio`, `roi.pooler_type`) and the conv tower."""
    channels = {s.channels for s in input_shape.values()}
    if len(channels) != 1:
        raise ValueError(f"the mask head needs inputs that share one channel count, got "
                         f"{ {k: s.channels for k, s in input_shape.items()} }")
    m = spec.mask
    pooler = RoIPooler([s.stride for s in input_shape.values()], m.pooler_resolution,
                       sampling_ratio=spec.roi.sampling_ratio, pooler_type=spec.roi.pooler_type)
    head = MaskRCNNHead(channels.pop(), spec.require_num_classes() + 1, num_convs=m.num_convs, conv_dim=m.conv_dim,
                        norm=m.norm)
    return pooler, head


def build_semantic_head(spec: ModelSpec, input_shape: dict[str, ShapeSpec]) -> SemanticFPNHead:
    """Panoptic FPN's semantic head on `semantic.in_features` of `input_shape` (channels and strides from the
    shapes), for `num_classes` + background classes."""
    s = spec.semantic
    missing = [f for f in s.in_features if f not in input_shape]
    if missing:
        raise ValueError(f"the semantic head reads {list(s.in_features)} but the backbone gives {list(input_shape)}; "
                         "set semantic.in_features")
    shapes = {f: input_shape[f] for f in s.in_features}
    channels = {v.channels for v in shapes.values()}
    if len(channels) != 1:
        raise ValueError(f"the semantic head needs inputs that share one channel count, got "
                         f"{ {k: v.channels for k, v in shapes.items()} }")
    return SemanticFPNHead(s.in_features, [v.stride for v in shapes.values()], channels.pop(),
                           spec.require_num_classes() + 1, conv_dims=s.conv_dims, common_stride=s.common_stride,
                           norm=s.norm)


def _rcnn_parts(spec: ModelSpec, *, with_masks: bool) -> tuple[Backbone, RPN, RoIHeads]:
    """Backbone + FPN, RPN and the box branch (+ the mask branch), built in the seeded order: backbone,
    box head, RPN head, box predictor, mask head."""
    backbone = build_fpn_backbone(spec)
    roi_shapes = pooled_features(backbone.output_shape())
    box_head, resolution = build_box_head(spec, roi_shapes)
    rpn = build_rpn(spec, backbone.output_shape())
    if not with_masks:
        return backbone, rpn, build_roi_heads(spec, roi_shapes, box_head, resolution)
    predictor = build_box_predictor(spec, box_head)
    mask_pooler, mask_head = build_mask_head(spec, roi_shapes)
    roi_heads = build_roi_heads(spec, roi_shapes, box_head, resolution, predictor=predictor, cls=MaskRoIHeads,
                                mask_pooler=mask_pooler, mask_head=mask_head)
    return backbone, rpn, roi_heads


def build_mask_rcnn(spec: ModelSpec | None = None, mask: MaskSpec | None = None, **overrides: Any) -> MaskRCNN:
    """Mask R-CNN (FPN): the Faster R-CNN of `spec` with a mask branch, built directly.

    Args:
        spec: the model (default `ModelSpec()`); `num_classes` counts foreground classes and must be set.
        mask: replaces `spec.mask` (e.g. the second value of `torchvision_mask_spec`).
        **overrides: spec settings (`ModelSpec.replace`), e.g. `num_classes=5, backbone_width=8, mask_norm="GN"`.

    Example::

        model = build_mask_rcnn(*torchvision_mask_spec("maskrcnn_resnet50_fpn"))   # + load_torchvision_detector
        model = build_mask_rcnn(num_classes=80, backbone_name="resnet101")
    """
    spec = resolve_spec(spec, overrides)
    if mask is not None:
        spec = spec.replace(mask=mask)
    _require_fpn(spec, "mask head")
    spec.require_num_classes()
    backbone, rpn, roi_heads = _rcnn_parts(spec, with_masks=True)
    model = MaskRCNN(backbone, rpn, roi_heads, build_preprocessor(spec, backbone))
    model.spec = spec
    load_model_weights(model, spec)
    return model


def build_panoptic_fpn(spec: ModelSpec | None = None, *, with_masks: bool = False, **overrides: Any) -> PanopticFPN:
    """Faster R-CNN (Mask R-CNN with `with_masks`) + the semantic head on the same FPN.

    The semantic head predicts `num_classes` + background classes (the labels a COCO-style dataset paints
    from its instances, or a semantic PNG with the same labels); its loss is weighted by
    `semantic.loss_weight` (0.5 in Panoptic FPN).
    """
    spec = resolve_spec(spec, overrides)
    _require_fpn(spec, "panoptic FPN")
    spec.require_num_classes()
    backbone, rpn, roi_heads = _rcnn_parts(spec, with_masks=with_masks)
    head = build_semantic_head(spec, backbone.output_shape())
    model = PanopticFPN(backbone, rpn, roi_heads, build_preprocessor(spec, backbone), head,
                        semantic_loss_weight=spec.semantic.loss_weight, ignore_index=spec.semantic.ignore_index)
    model.spec = spec
    load_model_weights(model, spec)
    return model


def build_semantic_fpn(spec: ModelSpec | None = None, **overrides: Any) -> SemanticFPN:
    """Backbone + FPN (P2..P5, no P6: the head reads P2..P5 only) + semantic head, from `spec.backbone`,
    `spec.fpn`, `spec.semantic` and `spec.input`; `num_classes` + background classes (detector sections
    are not used)."""
    spec = resolve_spec(spec, overrides)
    _require_fpn(spec, "semantic FPN")
    spec.require_num_classes()
    backbone = build_fpn_backbone(spec, top_block="none")
    head = build_semantic_head(spec, backbone.output_shape())
    model = SemanticFPN(backbone, head, build_preprocessor(spec, backbone), loss_weight=spec.semantic.loss_weight,
                        ignore_index=spec.semantic.ignore_index)
    model.spec = spec
    load_model_weights(model, spec)
    return model


# ------------------------------------------------------------------------------------- torchvision's
def torchvision_mask_spec(name: str = "maskrcnn_resnet50_fpn", *, num_classes: int = 91
                          ) -> tuple[ModelSpec, MaskSpec]:
    """The spec of torchvision's `maskrcnn_resnet50_fpn` or `maskrcnn_resnet50_fpn_v2` and its mask head
    (`num_classes` background included, torchvision's convention): `build_mask_rcnn(*torchvision_mask_spec(name))`,
    then `detection.convert.load_torchvision_detector`, or `maskrcnn_resnet50_fpn(weights=...)` for both.

    Returns:
        `(spec, spec.mask)`: the mask settings are in the spec too; the pair keeps
        `build_mask_rcnn(spec.replace(...), mask)` working.
    """
    if name == "maskrcnn_resnet50_fpn":
        mask = MaskSpec()
    elif name == "maskrcnn_resnet50_fpn_v2":
        mask = MaskSpec(norm="BN")
    else:
        raise ValueError(f"unknown torchvision preset {name!r}; use 'maskrcnn_resnet50_fpn' or "
                         "'maskrcnn_resnet50_fpn_v2'")
    spec = torchvision_spec(name, num_classes=num_classes).replace(task="instance", mask=mask)
    return spec, mask


def _torchvision_mask_model_spec(name: str, *, num_classes: int) -> ModelSpec:
    return torchvision_mask_spec(name, num_classes=num_classes)[0]


def maskrcnn_resnet50_fpn(*, weights: object = None, num_classes: int | None = None, weights_backbone: object = None,
                          trainable_backbone_layers: int | None = None, **overrides: Any) -> MaskRCNN:
    """torchvision's `maskrcnn_resnet50_fpn` as our `MaskRCNN`: `weights` None, a checkpoint file, or
    torchvision's weight name ("DEFAULT", "COCO_V1", ...; the file from torch's hub cache, verified);
    `num_classes` background included, default the weights' (91); torchvision's other arguments
    (`weights_backbone`, `trainable_backbone_layers`, `min_size`, `box_score_thresh`, ...) or our spec settings.
    See `detection.models.build_torchvision_detector`."""
    return build_torchvision_detector("maskrcnn_resnet50_fpn", build_mask_rcnn, _torchvision_mask_model_spec,
                                      weights=weights, num_classes=num_classes, weights_backbone=weights_backbone,
                                      trainable_backbone_layers=trainable_backbone_layers,
                                      **overrides)  # type: ignore[return-value]


def maskrcnn_resnet50_fpn_v2(*, weights: object = None, num_classes: int | None = None,
                             weights_backbone: object = None, trainable_backbone_layers: int | None = None,
                             **overrides: Any) -> MaskRCNN:
    """torchvision's `maskrcnn_resnet50_fpn_v2` as our `MaskRCNN`; arguments as `maskrcnn_resnet50_fpn`."""
    return build_torchvision_detector("maskrcnn_resnet50_fpn_v2", build_mask_rcnn, _torchvision_mask_model_spec,
                                      weights=weights, num_classes=num_classes, weights_backbone=weights_backbone,
                                      trainable_backbone_layers=trainable_backbone_layers,
                                      **overrides)  # type: ignore[return-value]

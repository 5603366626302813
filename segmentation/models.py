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

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from backbone.base import Backbone
from backbone.shape_spec import ShapeSpec
from detection.faster_rcnn import FasterRCNN
from detection.models import (
    build_fpn_backbone,
    build_preprocessor,
    build_rcnn,
    build_torchvision_detector,
    load_model_weights,
    resolve_spec,
    torchvision_spec,
)
from detection.poolers import RoIPooler
from detection.preprocess import Preprocessor, check_images
from detection.roi_heads import RoIHeads
from detection.rpn import RPN
from detection.specs import MaskSpec, ModelSpec

from .mask_head import MaskRCNNHead, MaskRoIHeads, paste_masks_in_image
from .semantic_head import SemanticFPNHead

__all__ = ["MaskRCNN", "PanopticFPN", "SemanticFPN", "build_mask_head", "build_mask_rcnn", "build_panoptic_fpn",
           "build_semantic_fpn", "build_semantic_head", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
           "torchvision_mask_spec"]


class MaskRCNN(FasterRCNN):
    """Faster R-CNN with a mask branch (`roi_heads` is a `MaskRoIHeads`); the forward is `FasterRCNN`'s.

    - training: targets also hold `masks` (uint8 `[K, H, W]`, one per box, at the image's size); the
      losses add `loss_mask`.
    - eval: each image's dict also holds `masks`, float `[D, 1, H, W]` probabilities pasted into the
      image at its own size (threshold at 0.5 for binary masks), like torchvision.
    """

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
    """An R-CNN (Faster or Mask, by `roi_heads`) and a semantic FPN head on the same FPN, trained jointly: the
    R-CNN forward of `FasterRCNN` with the semantic head as its image head `semantic_head`.

    - training: targets also hold `sem_seg` (int64 `[H, W]` at the image's size, `ignore_index` = not
      labelled); the losses add `loss_sem_seg` multiplied by `semantic_loss_weight`.
    - eval: each image's dict also holds `sem_seg`, int64 `[H, W]` labels at the image's size.

    Args:
        backbone / rpn / roi_heads / preprocessor: as in `FasterRCNN`.
        semantic_head: a `SemanticFPNHead` on the backbone's outputs (its `loss_weight`, 0.5 in Panoptic FPN,
            and `ignore_index`, 255, apply).
        image_heads: more image heads beside it.
        spec: as in `FasterRCNN`.
    """

    semantic_head: SemanticFPNHead

    def __init__(self, backbone: Backbone, rpn: RPN, roi_heads: RoIHeads, preprocessor: Preprocessor,
                 semantic_head: SemanticFPNHead | None = None, *, image_heads: Mapping[str, nn.Module] | None = None,
                 spec: ModelSpec | None = None) -> None:
        heads = dict(image_heads or {})
        if semantic_head is not None:
            heads = {"semantic_head": semantic_head, **heads}
        if not isinstance(heads.get("semantic_head"), SemanticFPNHead):
            raise ValueError("PanopticFPN needs a SemanticFPNHead: pass semantic_head= (or image_heads="
                             "{'semantic_head': ...})")
        super().__init__(backbone, rpn, roi_heads, preprocessor, image_heads=heads, spec=spec)

    @property
    def semantic_loss_weight(self) -> float:
        """Weight of the semantic loss in the sum (the semantic head's `loss_weight`)."""
        return self.semantic_head.loss_weight

    @semantic_loss_weight.setter
    def semantic_loss_weight(self, value: float) -> None:
        self.semantic_head.loss_weight = value

    @property
    def ignore_index(self) -> int:
        """The label the semantic loss ignores (the semantic head's)."""
        return self.semantic_head.ignore_index


class SemanticFPN(nn.Module):
    """Semantic segmentation: backbone + FPN + `SemanticFPNHead`.

    - training: `model(images, targets)` with `targets[i]["sem_seg"]` int64 `[H, W]` at the image's
      size -> `{"loss_sem_seg": ...}` (times `loss_weight`).
    - eval: `model(images)` -> `[{"sem_seg": int64 [H, W]}, ...]` at each image's size.

    Args:
        backbone: an FPN (or any backbone with the head's `in_features`).
        semantic_head: the head (its `check_targets` / `losses` / `predict` are the model's).
        preprocessor: resizing, normalisation and batching (the detectors').
        loss_weight: sets the head's `loss_weight` (None keeps it).
        ignore_index: sets the head's `ignore_index` (None keeps it).
        spec: the `ModelSpec` the model was built from (the builder sets it).
    """

    spec: ModelSpec | None

    def __init__(self, backbone: Backbone, semantic_head: SemanticFPNHead, preprocessor: Preprocessor, *,
                 loss_weight: float | None = None, ignore_index: int | None = None,
                 spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.semantic_head = semantic_head
        self.preprocessor = preprocessor
        self.spec = spec
        if loss_weight is not None:
            semantic_head.loss_weight = loss_weight
        if ignore_index is not None:
            semantic_head.ignore_index = ignore_index

    @property
    def num_classes(self) -> int:
        """Semantic classes, background included."""
        return self.semantic_head.num_classes

    @property
    def loss_weight(self) -> float:
        """Multiplies the loss (the head's `loss_weight`)."""
        return self.semantic_head.loss_weight

    @property
    def ignore_index(self) -> int:
        """The label the loss ignores (the head's)."""
        return self.semantic_head.ignore_index

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
            self.semantic_head.check_targets(targets, original_sizes)  # type: ignore[arg-type]
        batch, sizes, _ = self.preprocessor(images)
        logits = self.semantic_head(self.backbone(batch))
        if self.training:
            assert targets is not None
            return self.semantic_head.losses(logits, targets, sizes, original_sizes, tuple(batch.shape[-2:]))
        return self.semantic_head.predict(logits, sizes, original_sizes)


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
                           norm=s.norm, loss_weight=s.loss_weight, ignore_index=s.ignore_index)


def _mask_branch(spec: ModelSpec, roi_shapes: dict[str, ShapeSpec]) -> tuple[type[RoIHeads], dict[str, Any]]:
    """The mask branch as the RoI heads' extra arguments (`detection.models.build_rcnn`'s `roi_branches`)."""
    mask_pooler, mask_head = build_mask_head(spec, roi_shapes)
    return MaskRoIHeads, {"mask_pooler": mask_pooler, "mask_head": mask_head}


def _semantic_branch(spec: ModelSpec, shapes: dict[str, ShapeSpec]) -> dict[str, nn.Module]:
    """The semantic head as an image head (`detection.models.build_rcnn`'s `image_heads`)."""
    return {"semantic_head": build_semantic_head(spec, shapes)}


def build_mask_rcnn(spec: ModelSpec | None = None, mask: MaskSpec | None = None, **overrides: Any) -> MaskRCNN:
    """Mask R-CNN (FPN): the Faster R-CNN of `spec` with a mask branch (`detection.models.build_rcnn`).

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
    return build_rcnn(spec, model_cls=MaskRCNN, roi_branches=_mask_branch)  # type: ignore[return-value]


def build_panoptic_fpn(spec: ModelSpec | None = None, *, with_masks: bool = False, **overrides: Any) -> PanopticFPN:
    """Faster R-CNN (Mask R-CNN with `with_masks`) + the semantic head on the same FPN
    (`detection.models.build_rcnn` with the semantic head as an image head).

    The semantic head predicts `num_classes` + background classes (the labels a COCO-style dataset paints
    from its instances, or a semantic PNG with the same labels); its loss is weighted by
    `semantic.loss_weight` (0.5 in Panoptic FPN).
    """
    spec = resolve_spec(spec, overrides)
    _require_fpn(spec, "panoptic FPN")
    return build_rcnn(spec, model_cls=PanopticFPN, roi_branches=_mask_branch if with_masks else None,
                      image_heads=_semantic_branch)  # type: ignore[return-value]


def build_semantic_fpn(spec: ModelSpec | None = None, **overrides: Any) -> SemanticFPN:
    """Backbone + FPN (P2..P5, no P6: the head reads P2..P5 only) + semantic head, from `spec.backbone`,
    `spec.fpn`, `spec.semantic` and `spec.input`; `num_classes` + background classes (detector sections
    are not used)."""
    spec = resolve_spec(spec, overrides)
    _require_fpn(spec, "semantic FPN")
    spec.require_num_classes()
    backbone = build_fpn_backbone(spec, top_block="none")
    head = build_semantic_head(spec, backbone.output_shape())
    model = SemanticFPN(backbone, head, build_preprocessor(spec, backbone), spec=spec)
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

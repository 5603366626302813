"""Faster R-CNN builders (FPN and C4) on any registered backbone, and torchvision's architectures.

Each part has a small builder that takes the `ModelSpec` and the `output_shape()` of what feeds it:
in-channels, strides and levels come from the modules, never from the spec (detectron2's
`from_config(cfg, input_shape)`). One short builder per model assembles them:

- `build_faster_rcnn(spec, **overrides)`: backbone (+FPN), RPN, box branch, preprocessor;
- `fasterrcnn_resnet50_fpn(weights=..., num_classes=...)` and `fasterrcnn_resnet50_fpn_v2`: torchvision's
  architectures, with torchvision's class convention (background included) and weights from a file or
  torchvision's weight enums (the file in torch's hub cache, its hash verified).

Variants are data: `build_faster_rcnn(num_classes=80, backbone_name="resnet101", arch="c4")` and
`backbone_name="vgg16"` differ in one value, which is how the ResNet paper's VGG-16 -> ResNet-101 swap
is made.

Parts are built in a fixed order (backbone, box head, RPN head, box predictor, then any extra head) so
that seeded initialisations are reproducible from one version to the next.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from backbone import FPN, build_backbone
from backbone.base import Backbone
from backbone.layers import get_norm
from backbone.resnet import ResNet
from backbone.shape_spec import ShapeSpec
from backbone.vgg import VGGFCHead
from backbone.weights import (
    WEIGHT_SUFFIXES,
    load_weights,
    read_state_dict,
    resolve_imagenet_weights,
    resolve_torchvision_weights,
    to_classifier_layout,
    torchvision_weights_entry,
)

from .anchors import AnchorGenerator
from .convert import load_detector_weights
from .faster_rcnn import FasterRCNN
from .poolers import RoIPooler
from .preprocess import Preprocessor
from .roi_heads import ConvFCHead, FastRCNNPredictor, Res5Head, RoIHeads, TwoMLPHead
from .rpn import RPN, RPNHead
from .specs import C4_ANCHOR_SIZES, FPN_ANCHOR_SIZES, ModelSpec

__all__ = [
    "TORCHVISION_DETECTORS",
    "build_box_head",
    "build_box_predictor",
    "build_c4_trunk_and_head",
    "build_faster_rcnn",
    "build_fpn_backbone",
    "build_preprocessor",
    "build_rcnn",
    "build_roi_heads",
    "build_rpn",
    "build_torchvision_detector",
    "build_trunk",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "frozen_bn_without_weights",
    "load_model_weights",
    "pooled_features",
    "resolve_spec",
    "torchvision_overrides",
    "torchvision_spec",
]


def resolve_spec(spec: ModelSpec | None, overrides: dict[str, Any]) -> ModelSpec:
    """`spec` (default `ModelSpec()`) with `overrides` applied through `ModelSpec.replace`."""
    if spec is not None and not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a detection.specs.ModelSpec, got {type(spec).__name__}; keyword settings go "
                        "after it, e.g. build_faster_rcnn(spec, num_classes=3) or build_faster_rcnn(num_classes=3)")
    spec = spec or ModelSpec()
    return spec.replace(**overrides) if overrides else spec


def _common_channels(shapes: dict[str, ShapeSpec], who: str) -> int:
    channels = {s.channels for s in shapes.values()}
    if len(channels) != 1:
        raise ValueError(f"{who} needs inputs that share one channel count, got "
                         f"{ {k: s.channels for k, s in shapes.items()} }; put an FPN (or another neck with equal "
                         "widths) in front of it")
    return channels.pop()


# ------------------------------------------------------------------------------------ build checks
def frozen_bn_without_weights(spec: ModelSpec) -> str | None:
    """The warning for training a backbone with frozen BN but no pretrained weights, or None when that is not so.

    Frozen BN is BN with the statistics of the weights it was given; on a random initialisation those are mean 0
    and variance 1, so it normalises nothing: activations grow layer after layer, the loss can grow by orders
    of magnitude in the first iterations and activations can overflow to inf/NaN. Only a training run
    asks (an evaluation loads a checkpoint over the random weights).
    """
    b = spec.backbone
    if b.norm != "FrozenBN" or b.name == "vgg16" or b.weights is not None or spec.weights is not None:
        return None
    return (f"model.backbone.norm=FrozenBN with no pretrained weights (model.backbone.weights and model.weights "
            f"are null): frozen BN keeps the random initialisation's statistics, so the {b.name} backbone is not "
            "normalised at all and the loss can grow by orders of magnitude. To train from scratch use "
            "model.backbone.norm=GN (or BN, SyncBN); to fine-tune, give weights: model.backbone.weights=imagenet "
            "(or a file)")


# ----------------------------------------------------------------------------------------- backbones
def build_trunk(spec: ModelSpec, **kwargs: Any) -> Backbone:
    """The registered backbone `spec.backbone.name` with its norm, freezing and width, weights loaded.

    `kwargs` go to the backbone's constructor (e.g. `out_features`). `backbone.weights` is None, "imagenet"
    (torchvision/timm cache, see `backbone.weights.resolve_imagenet_weights`) or a file.
    """
    b = spec.backbone
    norm = b.norm
    if b.name == "vgg16" and norm in ("FrozenBN", "BN"):
        norm = "none"  # VGG-16 has no norm layers: the ResNet defaults FrozenBN / BN mean "as published"
    if b.width:
        kwargs["width"] = b.width
    trunk = build_backbone(b.name, norm=norm, freeze_at=b.freeze_at, **kwargs)
    if b.weights is not None:
        load_weights(trunk, _imagenet_or_file(b.name, b.weights), strict=True)
    if b.checkpoint is not False and (isinstance(b.checkpoint, bool) or len(b.checkpoint)):
        setter = getattr(trunk, "set_grad_checkpointing", None)
        if not callable(setter) or not hasattr(trunk, "stage_names"):
            raise ValueError(f"model.backbone.checkpoint={b.checkpoint!r}: the backbone {b.name!r} has no ResNet "
                             "stages to checkpoint; it works with the ResNet family (resnet18..152, v2, plain)")
        try:
            setter(b.checkpoint if isinstance(b.checkpoint, bool) else tuple(b.checkpoint))
        except ValueError as err:
            raise ValueError(f"model.backbone.checkpoint: {err}") from None
    return trunk


def build_fpn_backbone(spec: ModelSpec, *, top_block: str = "maxpool") -> FPN:
    """Trunk + FPN (`fpn.channels`, `fpn.norm`): P2..P6 with the default max-pool top block (Faster R-CNN),
    P2..P5 with `top_block="none"` (the semantic FPN)."""
    return FPN(build_trunk(spec), out_channels=spec.fpn.channels, norm=spec.fpn.norm, top_block=top_block)


def build_c4_trunk_and_head(spec: ModelSpec) -> tuple[Backbone, nn.Module, int]:
    """The C4 design: a trunk ending at stride 16 and the per-RoI head that continues it.

    ResNet: the trunk up to res4, and res5 (+ global average pooling) per 14x14 RoI
    (`ResNet.split_last_stage`). VGG-16: conv1..conv5_3, and fc6/fc7 per 7x7 RoI (loaded from the
    ImageNet classifier's file when `backbone.weights` is given).

    Returns:
        `(trunk, box_head, pooler_resolution)`.
    """
    name, weights = spec.backbone.name, spec.backbone.weights
    if name.startswith("vgg"):
        trunk = build_trunk(spec, out_features=("conv5",))
        channels = trunk.output_shape()["conv5"].channels
        resolution = spec.roi.pooler_resolution or 7
        head: nn.Module = VGGFCHead(channels, resolution, hidden=4096)
        if weights is not None:
            _load_classifier_part(head, "fc_head.", name, weights, strict=True)
        return trunk, head, resolution
    trunk = build_trunk(spec, out_features=("res4", "res5"))
    if not isinstance(trunk, ResNet):
        raise ValueError(f"backbone.name={name!r}: arch 'c4' needs a ResNet or VGG trunk (its last stage runs per "
                         "RoI); use arch 'fpn' for other backbones")
    out_channels = trunk.output_shape()["res5"].channels
    trunk, res5 = trunk.split_last_stage()
    head_norm = None
    if trunk.preact:  # pre-activation nets end with BN + ReLU after the last stage
        head_norm = get_norm(spec.backbone.norm, out_channels)
        if weights is not None:
            _load_classifier_part(head_norm, "head_norm.", name, weights, strict=False)
    return trunk, Res5Head(res5, out_channels, head_norm), spec.roi.pooler_resolution or 14


def _imagenet_or_file(arch: str, weights: str | os.PathLike) -> str | os.PathLike:
    return resolve_imagenet_weights(arch) if weights == "imagenet" else weights


def _load_classifier_part(module: nn.Module, prefix: str, arch: str, weights: str | os.PathLike, *,
                          strict: bool) -> None:
    """Load `prefix*` keys of an ImageNet classifier file (fc6/fc7 of VGG, the final norm of v2 nets)."""
    sd = to_classifier_layout(read_state_dict(_imagenet_or_file(arch, weights)))[0]
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if sub:  # a trunk-only file leaves the part at its initialisation
        module.load_state_dict(sub, strict=strict)


# ------------------------------------------------------------------------------------------- heads
def pooled_features(input_shape: dict[str, ShapeSpec]) -> dict[str, ShapeSpec]:
    """The levels RoIs are pooled from: the first four (P2..P5; a fifth, P6, serves the RPN only)."""
    return dict(list(input_shape.items())[:4])


def build_rpn(spec: ModelSpec, input_shape: dict[str, ShapeSpec]) -> RPN:
    """RPN on every level of `input_shape` (their channels must be equal); anchors from `rpn.anchor_sizes`
    or the architecture's default, one stride per level from the shapes."""
    r = spec.rpn
    channels = _common_channels(input_shape, "the RPN head")
    if spec.arch == "c4":
        sizes = r.anchor_sizes or C4_ANCHOR_SIZES
        if len(sizes) > 1:  # one feature level in C4: per-level sizes become that level's sizes
            sizes = (tuple(s for level in sizes for s in level),)
    else:
        sizes = r.anchor_sizes or FPN_ANCHOR_SIZES[: len(input_shape)]
    anchors = AnchorGenerator(sizes, r.aspect_ratios, [s.stride for s in input_shape.values()],
                              torchvision_strides=spec.torchvision_anchor_strides)
    head = RPNHead(channels, anchors.num_anchors_per_location[0], r.conv_depth)
    return RPN(tuple(input_shape), head, anchors, pre_nms_topk=r.pre_nms_topk, post_nms_topk=r.post_nms_topk,
               nms_thresh=r.nms_thresh, fg_iou=r.fg_iou, bg_iou=r.bg_iou, batch_size_per_image=r.batch_size_per_image,
               positive_fraction=r.positive_fraction, box_loss=spec.box_loss)


def build_box_head(spec: ModelSpec, input_shape: dict[str, ShapeSpec]) -> tuple[nn.Module, int]:
    """The FPN box head (`roi.box_head`: "2fc" or "4conv1fc") on RoIs pooled from `input_shape`.

    Returns:
        `(box_head, pooler_resolution)`; the head maps `(K, C, R, R)` to `(K, out_channels)`.
    """
    roi = spec.roi
    channels = _common_channels(input_shape, "the box head")
    resolution = roi.pooler_resolution or 7
    if roi.box_head == "2fc":
        return TwoMLPHead(channels, resolution, roi.fc_dim), resolution
    if roi.box_head == "4conv1fc":
        return ConvFCHead(channels, resolution, num_convs=roi.num_convs, conv_dim=roi.conv_dim, fc_dim=roi.fc_dim,
                          norm=roi.box_head_norm), resolution
    raise ValueError(f"roi.box_head={roi.box_head!r}; use '2fc' or '4conv1fc' for FPN models")


def build_box_predictor(spec: ModelSpec, box_head: nn.Module) -> FastRCNNPredictor:
    """Class scores (`num_classes` + background) and class-specific box deltas on the box head's features."""
    return FastRCNNPredictor(box_head.out_channels, spec.require_num_classes() + 1)


def build_roi_heads(spec: ModelSpec, input_shape: dict[str, ShapeSpec], box_head: nn.Module, resolution: int, *,
                    predictor: FastRCNNPredictor | None = None, cls: type[RoIHeads] = RoIHeads,
                    **extra: Any) -> RoIHeads:
    """The box branch on `input_shape`'s levels (pooler strides from the shapes), settings from `spec.roi`.

    `cls` and `extra` build a subclass with more heads (e.g. `MaskRoIHeads(..., mask_pooler=, mask_head=)`);
    `predictor` defaults to `build_box_predictor(spec, box_head)`.
    """
    roi = spec.roi
    pooler = RoIPooler([s.stride for s in input_shape.values()], resolution, sampling_ratio=roi.sampling_ratio,
                       pooler_type=roi.pooler_type)
    return cls(tuple(input_shape), pooler, box_head, spec.require_num_classes() + 1, fg_iou=roi.fg_iou,
               bg_iou=roi.bg_iou, batch_size_per_image=roi.batch_size_per_image,
               positive_fraction=roi.positive_fraction, bbox_reg_weights=roi.bbox_reg_weights,
               score_thresh=roi.score_thresh, nms_thresh=roi.nms_thresh, detections_per_img=roi.detections_per_img,
               box_loss=spec.box_loss, predictor=predictor, **extra)


def build_preprocessor(spec: ModelSpec, backbone: Backbone) -> Preprocessor:
    """Resizing and normalisation from `spec.input`; padding to the backbone's `size_divisibility` (>= 32)."""
    i = spec.input
    return Preprocessor(min_size=i.min_size, max_size=i.max_size, test_min_size=i.test_min_size,
                        test_max_size=i.test_max_size, pixel_mean=i.pixel_mean, pixel_std=i.pixel_std,
                        size_divisibility=max(32, backbone.size_divisibility))


def load_model_weights(model: nn.Module, spec: ModelSpec) -> None:
    """Load `spec.weights` (ours or a torchvision detection checkpoint) into a built model, strictly."""
    if spec.weights is not None:
        load_detector_weights(model, spec.weights)


# ---------------------------------------------------------------------------------------- R-CNN
#: Builds the RoI heads' extra branches from the spec and the pooled levels' shapes:
#: `(RoIHeads subclass, its extra constructor arguments)`, e.g. `(MaskRoIHeads, {"mask_head": ..., ...})`.
RoIBranches = Callable[[ModelSpec, dict[str, ShapeSpec]], tuple[type[RoIHeads], dict[str, Any]]]
#: Builds the image heads (`detection.faster_rcnn.ImageHead`, by attribute name) from the spec and the
#: backbone's output shapes, e.g. `{"semantic_head": SemanticFPNHead(...)}`.
ImageHeads = Callable[[ModelSpec, dict[str, ShapeSpec]], dict[str, nn.Module]]


def build_rcnn(spec: ModelSpec, *, model_cls: type[FasterRCNN] = FasterRCNN, backbone_module: Backbone | None = None,
               roi_branches: RoIBranches | None = None, image_heads: ImageHeads | None = None) -> FasterRCNN:
    """The one R-CNN assembly: Faster R-CNN (FPN or C4) of `spec`, with the extra heads as arguments.

    Parts are built in the seeded order (backbone, box head, RPN head, box predictor, the RoI heads' extra
    branches, the image heads), the spec's weights loaded last; `model.spec` is `spec`.
    `build_faster_rcnn`, `segmentation.build_mask_rcnn` (`roi_branches` adds the mask branch) and
    `segmentation.build_panoptic_fpn` (`image_heads` adds the semantic head) are this function.

    Args:
        spec: the model; `spec.num_classes` must be set.
        model_cls: `FasterRCNN` or a subclass with its constructor (e.g. `segmentation.MaskRCNN`).
        backbone_module: any FPN-style `Backbone` instead of the one `spec.backbone` / `spec.fpn` describe.
        roi_branches: the RoI heads' class and extra arguments (see `RoIBranches`); None: the box branch only.
        image_heads: heads on the backbone's maps (see `ImageHeads`); None: none.
    """
    spec.require_num_classes()
    if spec.arch == "c4":
        if backbone_module is not None:
            raise ValueError("backbone_module is for arch 'fpn' (FPN-style heads on its outputs); arch 'c4' builds "
                             "its trunk and per-RoI head from spec.backbone")
        if roi_branches is not None or image_heads is not None:
            raise ValueError(f"arch='c4' builds Faster R-CNN only; the {'mask' if roi_branches else 'semantic'} head "
                             "is built on an FPN: use arch='fpn'")
        backbone, box_head, resolution = build_c4_trunk_and_head(spec)
        (name, shape), = backbone.output_shape().items()
        if shape.stride != 16:
            raise ValueError(f"the C4 trunk's output {name!r} has stride {shape.stride}; C4 pools RoIs at stride 16")
        roi_shapes = backbone.output_shape()
    else:
        backbone = backbone_module if backbone_module is not None else build_fpn_backbone(spec)
        roi_shapes = pooled_features(backbone.output_shape())
        box_head, resolution = build_box_head(spec, roi_shapes)
    rpn = build_rpn(spec, backbone.output_shape())
    predictor = build_box_predictor(spec, box_head)
    cls, extra = roi_branches(spec, roi_shapes) if roi_branches is not None else (RoIHeads, {})
    roi_heads = build_roi_heads(spec, roi_shapes, box_head, resolution, predictor=predictor, cls=cls, **extra)
    heads = image_heads(spec, backbone.output_shape()) if image_heads is not None else {}
    model = model_cls(backbone, rpn, roi_heads, build_preprocessor(spec, backbone), image_heads=heads, spec=spec)
    load_model_weights(model, spec)
    return model


def build_faster_rcnn(spec: ModelSpec | None = None, *, backbone_module: Backbone | None = None,
                      **overrides: Any) -> FasterRCNN:
    """Faster R-CNN from a spec (+ `overrides`, see `ModelSpec.replace`), e.g.
    `build_faster_rcnn(num_classes=80, backbone_name="resnet101", arch="c4")`.

    Args:
        spec: the model (default `ModelSpec()`: R50-FPN, detectron2/torchvision settings);
            `spec.num_classes` counts foreground classes and must be set.
        backbone_module: any FPN-style `Backbone` whose outputs share one channel count (an FPN of ours,
            `backbone.from_torchvision(...)`, a `TimmBackbone` + FPN) instead of building one from
            `spec.backbone` / `spec.fpn`; the heads read its `output_shape()`.
        **overrides: spec settings, e.g. `num_classes=3, backbone_width=8`.

    Returns:
        The model, eval outputs in torchvision's convention; `model.spec` is the spec it was built from.

    Raises:
        ValueError: `num_classes` unset, an unknown setting, or parts that do not fit (the message says which).
    """
    return build_rcnn(resolve_spec(spec, overrides), backbone_module=backbone_module)


# ------------------------------------------------------------------------------------- torchvision's
TORCHVISION_DETECTORS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn",
                         "maskrcnn_resnet50_fpn_v2")


def torchvision_spec(name: str = "fasterrcnn_resnet50_fpn", *, num_classes: int = 91) -> ModelSpec:
    """The spec of a torchvision detection architecture and its inference settings.

    Args:
        name: `fasterrcnn_resnet50_fpn` or `fasterrcnn_resnet50_fpn_v2` (and the `maskrcnn_*` twins, whose
            mask branch `segmentation.torchvision_mask_spec` adds).
        num_classes: torchvision's convention, background included (91 for COCO); the spec stores
            `num_classes - 1` foreground classes.

    Load torchvision's weights with `detection.convert.load_torchvision_detector`, or use
    `fasterrcnn_resnet50_fpn(weights=...)`, which does both.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} counts the background here (torchvision's convention): "
                         "give an int >= 2, e.g. 91 for COCO")
    base = ModelSpec(num_classes=num_classes - 1, torchvision_anchor_strides=True).replace(
        backbone_name="resnet50", backbone_norm="FrozenBN", backbone_freeze_at=0)
    if name in ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn"):
        return base
    if name in ("fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn_v2"):
        return base.replace(backbone_norm="BN", fpn_norm="BN", rpn_conv_depth=2, box_head="4conv1fc",
                            box_head_norm="BN")
    raise ValueError(f"unknown torchvision architecture {name!r}; use one of {', '.join(TORCHVISION_DETECTORS)}")


def _is_file_reference(weights: object) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    return isinstance(weights, str) and (os.sep in weights or "/" in weights or weights.endswith(WEIGHT_SUFFIXES)
                                         or os.path.exists(weights))


def _classes_in_state_dict(sd: dict[str, Tensor]) -> int | None:
    for key in ("roi_heads.box_predictor.cls_score.weight", "roi_heads.predictor.cls_score.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    return None


# torchvision's keyword arguments of its R-CNN builders whose value maps onto one spec setting of ours.
_TORCHVISION_RENAMED = {
    "image_mean": "pixel_mean", "image_std": "pixel_std",
    "rpn_fg_iou_thresh": "rpn_fg_iou", "rpn_bg_iou_thresh": "rpn_bg_iou",
    "box_score_thresh": "roi_score_thresh", "box_nms_thresh": "roi_nms_thresh",
    "box_detections_per_img": "roi_detections_per_img", "box_fg_iou_thresh": "roi_fg_iou",
    "box_bg_iou_thresh": "roi_bg_iou", "box_batch_size_per_image": "roi_batch_size_per_image",
    "box_positive_fraction": "roi_positive_fraction", "bbox_reg_weights": "roi_bbox_reg_weights",
}
# (our (train, test) pair, index) of torchvision's separate train / test top-k arguments.
_TORCHVISION_TOPK = {
    "rpn_pre_nms_top_n_train": ("rpn_pre_nms_topk", 0), "rpn_pre_nms_top_n_test": ("rpn_pre_nms_topk", 1),
    "rpn_post_nms_top_n_train": ("rpn_post_nms_topk", 0), "rpn_post_nms_top_n_test": ("rpn_post_nms_topk", 1),
}
# torchvision arguments that take modules: the spec describes the parts instead.
_TORCHVISION_MODULES = ("backbone", "norm_layer", "rpn_anchor_generator", "rpn_head", "box_roi_pool", "box_head",
                        "box_predictor", "mask_roi_pool", "mask_head", "mask_predictor")
_TORCHVISION_TRAINABLE_MAX = 5  # stem + res2..res5, as torchvision's trainable_backbone_layers counts them


def torchvision_overrides(spec: ModelSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Spec overrides from keyword arguments of torchvision's R-CNN builders, with torchvision's meaning;
    the spec's own spellings pass through unchanged (and win over a torchvision spelling of the same value).

    `min_size` / `max_size` set the training *and* the test size (torchvision's one transform resizes both;
    at test time it uses the last `min_size`); `rpn_pre_nms_top_n_train` / `_test` (and `post`) fill our
    `(train, test)` pairs; `box_*`, `rpn_*_iou_thresh`, `image_mean` / `image_std`, `bbox_reg_weights` are
    renamed (`bbox_reg_weights=None` keeps the default).

    Raises:
        ValueError: a module-valued argument (`rpn_head=`, `box_predictor=`, ...): build the parts with
            `build_faster_rcnn` / `build_mask_rcnn` or assign the module after building.
    """
    out = dict(kwargs)
    modules = [k for k in _TORCHVISION_MODULES if k in out]
    if modules:
        raise ValueError(f"{', '.join(modules)}: torchvision's module arguments are not taken here; the spec describes "
                         "the parts (e.g. rpn_conv_depth=2, box_head='4conv1fc', fc_dim=...), or replace the module on "
                         "the built model (model.roi_heads.predictor = FastRCNNPredictor(...))")
    for tv_name, ours in _TORCHVISION_RENAMED.items():
        if tv_name in out:
            value = out.pop(tv_name)
            if tv_name == "bbox_reg_weights" and value is None:
                continue
            out.setdefault(ours, tuple(value) if tv_name in ("image_mean", "image_std", "bbox_reg_weights") else value)
    pairs: dict[str, list[int]] = {}
    for tv_name, (ours, i) in _TORCHVISION_TOPK.items():
        if tv_name in out:
            section, field_name = ours.split("_", 1)
            pair = pairs.setdefault(ours, list(getattr(getattr(spec, section), field_name)))
            pair[i] = out.pop(tv_name)
    for ours, pair in pairs.items():
        out.setdefault(ours, tuple(pair))
    if "min_size" in out:  # torchvision's: training and test
        sizes = out.pop("min_size")
        sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
        out.setdefault("input_min_size", sizes)
        if "test_min_size" not in out:
            out.setdefault("input_test_min_size", sizes[-1] if sizes else 0)  # () is refused by the spec
    if "max_size" in out:
        size = out.pop("max_size")
        out.setdefault("input_max_size", size)
        if "test_max_size" not in out:
            out.setdefault("input_test_max_size", size)
    return out


def _backbone_weights_file(weights_backbone: object) -> str:
    """`weights_backbone` (torchvision's ResNet-50 weight name or member, "imagenet", or a file) as what
    `backbone.weights` takes: "imagenet" or a path (torchvision's file from torch's hub cache, verified)."""
    if weights_backbone == "imagenet" or _is_file_reference(weights_backbone):
        return os.fspath(weights_backbone)  # type: ignore[arg-type]
    return str(resolve_torchvision_weights(torchvision_weights_entry("resnet50", weights_backbone)))


def _trainable_to_freeze_at(trainable: object, is_trained: bool, overrides: dict[str, Any]) -> int | None:
    """`backbone_freeze_at` from torchvision's `trainable_backbone_layers` (None: the default for `is_trained`),
    following torchvision: 3 trainable stages by default with weights, all of them without."""
    if trainable is not None and ("backbone_freeze_at" in overrides or "freeze_at" in overrides):
        raise ValueError("give trainable_backbone_layers (torchvision's) or backbone_freeze_at (ours), not both: "
                         "backbone_freeze_at = 5 - trainable_backbone_layers")
    if trainable is None:
        return _TORCHVISION_TRAINABLE_MAX - 3 if is_trained else None
    top = _TORCHVISION_TRAINABLE_MAX
    if isinstance(trainable, bool) or not isinstance(trainable, int) or not 0 <= trainable <= top:
        raise ValueError(f"trainable_backbone_layers={trainable!r}: give an int from 0 (all frozen) to "
                         f"{_TORCHVISION_TRAINABLE_MAX} (stem and res2..res5 trainable)")
    if not is_trained:
        warnings.warn(f"trainable_backbone_layers={trainable} has no effect without weights or weights_backbone "
                      "(torchvision's rule): every backbone stage stays trainable", UserWarning, stacklevel=4)
        return None
    return _TORCHVISION_TRAINABLE_MAX - trainable


def build_torchvision_detector(name: str, builder: Callable[..., nn.Module],
                               spec_fn: Callable[..., ModelSpec], *, weights: object = None,
                               num_classes: int | None = None, weights_backbone: object = None,
                               trainable_backbone_layers: int | None = None, **overrides: Any) -> nn.Module:
    """Shared by the torchvision-named builders: resolve `weights`, settle `num_classes`, build, load.

    `weights`: None; a checkpoint file (torchvision's or ours); or torchvision's weight name for `name`
    ("DEFAULT", "COCO_V1", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1" or the enum member), whose file is
    taken from torch's hub cache (`torch.hub.get_dir()/checkpoints`, its hash prefix verified) or downloaded
    when downloads are allowed. `num_classes` (background included) defaults to the weights' (91 without
    weights); a different value raises.

    torchvision's other arguments mean what they mean there: `weights_backbone` (None here by default, nothing
    is fetched; torchvision's ResNet-50 weight name, "imagenet" or a file; ignored when `weights` is given),
    `trainable_backbone_layers` (0..5; default 3 with weights or backbone weights, else 5 and a warning
    if another value is given), and the keyword arguments `torchvision_overrides` translates (`min_size`,
    `box_score_thresh`, ...). Our spec settings (`test_min_size=`, `backbone_width=`, ...) are accepted too.
    """
    state: dict[str, Tensor] | None = None
    entry = None
    if weights is None:
        from_weights, source = None, ""
    elif _is_file_reference(weights):
        state = read_state_dict(weights)  # type: ignore[arg-type]
        from_weights, source = _classes_in_state_dict(state), str(weights)
    else:
        entry = torchvision_weights_entry(name, weights)
        from_weights, source = len(entry.meta["categories"]), f"torchvision's {entry}"
    if num_classes is None:
        num_classes = from_weights or 91
    elif from_weights is not None and num_classes != from_weights:
        raise ValueError(f"num_classes={num_classes} but the weights {source} have {from_weights} classes "
                         f"(background included); omit num_classes or pass num_classes={from_weights}")
    if entry is not None:
        state = read_state_dict(resolve_torchvision_weights(entry))
    base = spec_fn(name, num_classes=num_classes)
    overrides = torchvision_overrides(base, overrides)
    if state is not None:
        weights_backbone = None  # the full checkpoint holds the backbone too (torchvision's rule)
    freeze_at = _trainable_to_freeze_at(trainable_backbone_layers, state is not None or weights_backbone is not None,
                                        overrides)
    if freeze_at is not None:
        overrides = {"backbone_freeze_at": freeze_at, **overrides}
    if weights_backbone is not None:
        overrides["backbone_weights"] = _backbone_weights_file(weights_backbone)
    model = builder(base, **overrides)
    if state is not None:
        load_detector_weights(model, state)
    return model


def fasterrcnn_resnet50_fpn(*, weights: object = None, num_classes: int | None = None,
                            weights_backbone: object = None, trainable_backbone_layers: int | None = None,
                            **overrides: Any) -> FasterRCNN:
    """torchvision's `fasterrcnn_resnet50_fpn` architecture as our `FasterRCNN`, taking torchvision's arguments
    (see `build_torchvision_detector`: `weights`, `num_classes` background included, `weights_backbone`,
    `trainable_backbone_layers`, `min_size`, `box_score_thresh`, ...) or our spec settings.

    Example::

        model = fasterrcnn_resnet50_fpn(weights="COCO_V1").eval()   # the file from torch's hub cache
        model = fasterrcnn_resnet50_fpn(weights="path/to/checkpoint.pth", test_min_size=600)
        model = fasterrcnn_resnet50_fpn(num_classes=2, min_size=100, max_size=100)   # torchvision's keywords
    """
    return build_torchvision_detector("fasterrcnn_resnet50_fpn", build_faster_rcnn, torchvision_spec,
                                      weights=weights, num_classes=num_classes, weights_backbone=weights_backbone,
                                      trainable_backbone_layers=trainable_backbone_layers,
                                      **overrides)  # type: ignore[return-value]


def fasterrcnn_resnet50_fpn_v2(*, weights: object = None, num_classes: int | None = None,
                               weights_backbone: object = None, trainable_backbone_layers: int | None = None,
                               **overrides: Any) -> FasterRCNN:
    """torchvision's `fasterrcnn_resnet50_fpn_v2` (BN trunk and FPN, 2-conv RPN head, 4conv1fc box head) as
    our `FasterRCNN`; arguments as `fasterrcnn_resnet50_fpn`."""
    return build_torchvision_detector("fasterrcnn_resnet50_fpn_v2", build_faster_rcnn, torchvision_spec,
                                      weights=weights, num_classes=num_classes, weights_backbone=weights_backbone,
                                      trainable_backbone_layers=trainable_backbone_layers,
                                      **overrides)  # type: ignore[return-value]

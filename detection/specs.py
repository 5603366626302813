"""The model schema: one set of nested dataclasses that is both the config's ``model`` section and what
the builders read.

``ModelSpec`` holds the top-level choices (task, architecture, classes, full-model weights) and one
section per part: ``backbone``, ``fpn``, ``rpn``, ``roi``, ``mask``, ``semantic``, ``input``. The
config loader (``resnet_det.config``) parses YAML straight into these classes, so adding a field
is one edit: the field, its default and the one-line docstring after it (the loader's
convention). Channels and strides never appear here: the builders read them from the
``output_shape()`` of the module that feeds each head.

``replace`` (every spec class) copies a spec with some fields changed. On ``ModelSpec`` a keyword
names a whole section (``rpn=RPNSpec(...)``), a top-level field (``num_classes=3``), a section's
field when no other section has a field of that name (``test_min_size=320``, ``fc_dim=64``), or
``<section>_<field>`` (``rpn_post_nms_topk=(2000, 300)``, ``backbone_name="resnet18"``,
``mask_norm="GN"``). An ambiguous name (``nms_thresh``: rpn or roi) or an unknown one raises a
``ValueError`` listing the valid spellings.

Example::

    spec = ModelSpec(num_classes=3).replace(backbone_name="resnet18", backbone_width=8, fpn_channels=32)
    spec.backbone.name, spec.fpn.channels     # ('resnet18', 32)

This module is part of the model layer: it imports nothing of the engine or the config loader.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from resnet_det_common import check

__all__ = [
    "C4_ANCHOR_SIZES",
    "FPN_ANCHOR_SIZES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneSpec",
    "FPNSpec",
    "InputSpec",
    "MaskSpec",
    "ModelSpec",
    "Norm",
    "ROISpec",
    "RPNSpec",
    "SemanticSpec",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Defaults of `rpn.anchor_sizes`: one size per FPN level (P2..P6), or all five on C4's single level.
FPN_ANCHOR_SIZES: tuple[tuple[float, ...], ...] = ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))
C4_ANCHOR_SIZES: tuple[tuple[float, ...], ...] = ((32.0, 64.0, 128.0, 256.0, 512.0),)

Norm = Literal["BN", "SyncBN", "FrozenBN", "GN", "none"]
"""Normalisation layer names (backbone.layers.get_norm)."""


def _is_spec(value: Any) -> bool:
    return isinstance(value, _Spec)


class _Spec:
    """`replace` for every spec dataclass (one implementation, a generic rule over the fields)."""

    def replace(self, **kwargs: Any) -> Self:
        """A copy with `kwargs` changed (validated again), resolving each name as the module docstring says.

        Raises:
            ValueError: an unknown or ambiguous name (the message lists the valid spellings), or a value
                out of its range.
            TypeError: a whole section given as something other than its spec class.
        """
        own = {f.name: f for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        sections = {n: getattr(self, n) for n in own if _is_spec(getattr(self, n))}
        direct: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for name, value in kwargs.items():
            if name in own:
                if name in sections and not isinstance(value, type(sections[name])):
                    raise TypeError(f"{name}={value!r}: a whole section must be a {type(sections[name]).__name__}; "
                                    f"to change one of its fields write {name}_<field>=...")
                direct[name] = value
                continue
            section, sub = self._resolve(name, sections)
            nested.setdefault(section, {})[sub] = value
        for section, values in nested.items():
            base = direct.get(section, sections[section])
            direct[section] = base.replace(**values)
        return dataclasses.replace(self, **direct)  # type: ignore[type-var]

    def _resolve(self, name: str, sections: dict[str, Any]) -> tuple[str, str]:
        """`(section, field)` of a keyword that is not a field of this spec itself."""
        unique: dict[str, list[str]] = {}
        for s, spec in sections.items():
            for f in dataclasses.fields(spec):
                unique.setdefault(f.name, []).append(s)
        candidates = [(s, name) for s in unique.get(name, [])]
        for s, spec in sections.items():
            rest = name[len(s) + 1:] if name.startswith(s + "_") else None
            if rest and rest in {f.name for f in dataclasses.fields(spec)} and (s, rest) not in candidates:
                candidates.append((s, rest))
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            spellings = " or ".join(f"{s}_{f}" for s, f in candidates)
            raise ValueError(f"{type(self).__name__}.replace: {name!r} is ambiguous, it names a field of "
                             f"{', '.join(s for s, _ in candidates)}; write {spellings}")
        valid = self.valid_names()
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{type(self).__name__}.replace: unknown setting {name!r}.{hint} Valid: {', '.join(valid)}")

    def valid_names(self) -> list[str]:
        """Every keyword `replace` accepts: own fields, `<section>_<field>`, and section fields whose name is
        unique across sections."""
        own = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        names = list(own)
        count: dict[str, int] = {}
        sections = [(n, getattr(self, n)) for n in own if _is_spec(getattr(self, n))]
        for _, spec in sections:
            for f in dataclasses.fields(spec):
                count[f.name] = count.get(f.name, 0) + 1
        for s, spec in sections:
            for f in dataclasses.fields(spec):
                names.append(f"{s}_{f.name}")
                if count[f.name] == 1 and f.name not in own:
                    names.append(f.name)
        return sorted(set(names))


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class BackboneSpec(_Spec):
    """The trunk (ResNet, VGG-16, ... from the backbone registry)."""

    name: str = "resnet50"
    """Backbone name in the backbone registry (resnet18/34/50/101/152, resnet50v2, vgg16, ...)."""
    weights: str | None = None
    """None (random init), "imagenet" (from the local torchvision/timm cache, verified), or a file path."""
    norm: Norm = "FrozenBN"
    """Normalisation of the backbone: FrozenBN, BN, SyncBN, GN, none (vgg16 has none: FrozenBN/BN mean none)."""
    freeze_at: int = 2
    """Freeze the stem (1) and stages up to res<freeze_at> (2 = stem + res2); 0 trains all."""
    width: int | None = None
    """Stem/first-stage width; null = the paper's (64). Small values make cheap test models of full depth."""
    checkpoint: bool | tuple[str, ...] = False
    """Activation checkpointing of the trunk's stages in training: true (all), false, or names ([res2, res3]).
    Applied by the engine's build_model (resnet-det train); less memory, one more stage forward per step."""

    def __post_init__(self) -> None:
        check(bool(self.name), "model.backbone.name", self.name, "name a registered backbone, e.g. resnet50")
        check(0 <= self.freeze_at <= 5, "model.backbone.freeze_at", self.freeze_at, "must be in 0..5")
        check(self.width is None or self.width > 0, "model.backbone.width", self.width,
              "must be > 0, or null for the paper's width")


@dataclass
class FPNSpec(_Spec):
    """Feature pyramid on the trunk's stages (FPN models only)."""

    channels: int = 256
    """Channels of every pyramid level (256 in the paper)."""
    norm: Norm = "none"
    """Norm after the FPN convolutions (none in the paper, BN in torchvision's v2 models)."""

    def __post_init__(self) -> None:
        check(self.channels > 0, "model.fpn.channels", self.channels, "must be > 0")


@dataclass
class RPNSpec(_Spec):
    """Region proposal network (Faster R-CNN paper values, detectron2's FPN defaults)."""

    anchor_sizes: tuple[tuple[float, ...], ...] | None = None
    """Anchor sizes in pixels, one tuple per feature level; null: (32,)..(512,) on P2..P6, or all five on C4's
    one level. C4 merges per-level sizes into its one level."""
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Anchor aspect ratios (height / width), shared by every level."""
    conv_depth: int = 1
    """3x3 convolutions of the RPN head (1 in the paper, 2 in torchvision's v2 models)."""
    pre_nms_topk: tuple[int, int] = (2000, 1000)
    """(train, test): proposals kept per level (per image) before NMS."""
    post_nms_topk: tuple[int, int] = (2000, 1000)
    """(train, test): proposals kept per image after NMS."""
    nms_thresh: float = 0.7
    """IoU threshold of the proposal NMS."""
    batch_size_per_image: int = 256
    """Anchors sampled per image for the RPN losses."""
    positive_fraction: float = 0.5
    """Largest fraction of positive anchors in that sample."""
    fg_iou: float = 0.7
    """Anchors with IoU >= this with a ground-truth box are positives."""
    bg_iou: float = 0.3
    """Anchors with IoU < this with every ground-truth box are negatives."""

    def __post_init__(self) -> None:
        if self.anchor_sizes is not None:
            check(len(self.anchor_sizes) > 0 and all(len(s) > 0 for s in self.anchor_sizes),
                  "model.rpn.anchor_sizes", self.anchor_sizes, "give at least one size per level, or null")
            check(all(s > 0 for level in self.anchor_sizes for s in level), "model.rpn.anchor_sizes",
                  self.anchor_sizes, "sizes must be > 0")
        check(len(self.aspect_ratios) > 0 and all(r > 0 for r in self.aspect_ratios),
              "model.rpn.aspect_ratios", self.aspect_ratios, "give at least one ratio, each > 0")
        check(self.conv_depth >= 0, "model.rpn.conv_depth", self.conv_depth, "must be >= 0")
        for key in ("pre_nms_topk", "post_nms_topk"):
            value = getattr(self, key)
            check(len(value) == 2 and all(v > 0 for v in value), f"model.rpn.{key}", value,
                  "give (train, test), both > 0, e.g. [2000, 1000]")
        check(0.0 < self.nms_thresh <= 1.0, "model.rpn.nms_thresh", self.nms_thresh, "must be in (0, 1]")
        check(self.batch_size_per_image > 0, "model.rpn.batch_size_per_image", self.batch_size_per_image,
              "must be > 0")
        check(0.0 < self.positive_fraction <= 1.0, "model.rpn.positive_fraction", self.positive_fraction,
              "must be in (0, 1]")
        check(0.0 <= self.bg_iou <= self.fg_iou <= 1.0, "model.rpn.bg_iou/fg_iou", (self.bg_iou, self.fg_iou),
              "need 0 <= bg_iou <= fg_iou <= 1")


@dataclass
class ROISpec(_Spec):
    """Box head on RoI features (Fast R-CNN sampling, detectron2's FPN defaults)."""

    box_head: Literal["2fc", "4conv1fc"] = "2fc"
    """FPN box head: two fully connected layers, or four convs then one fc. C4 runs res5 (or VGG fc6/fc7)."""
    fc_dim: int = 1024
    """Width of the fully connected layers of the FPN box heads."""
    conv_dim: int = 256
    """Channels of the convolutions of the "4conv1fc" box head."""
    num_convs: int = 4
    """Convolutions of the "4conv1fc" box head."""
    box_head_norm: Norm = "BN"
    """Norm of the "4conv1fc" box head's convolutions (BN, GN, none)."""
    pooler_resolution: int | None = None
    """Output size of the RoI pooling; null: 7 (FPN, VGG C4) or 14 (ResNet C4, before res5 halves it)."""
    pooler_type: Literal["roi_align", "roi_align_v2", "roi_pool"] = "roi_align"
    """RoIAlign (torchvision), aligned RoIAlign (detectron2), or the paper's RoI max pooling."""
    sampling_ratio: int = 2
    """RoIAlign sampling points per bin (0 = adaptive), for the box and the mask pooling."""
    batch_size_per_image: int = 512
    """RoIs sampled per image for the box head losses."""
    positive_fraction: float = 0.25
    """Largest fraction of foreground RoIs in that sample."""
    fg_iou: float = 0.5
    """RoIs with IoU >= this with a ground-truth box are foreground."""
    bg_iou: float = 0.5
    """RoIs with IoU < this with every ground-truth box are background."""
    bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    """Weights (wx, wy, ww, wh) of the box regression coding."""
    score_thresh: float = 0.05
    """Detections with a lower score are dropped at test time."""
    nms_thresh: float = 0.5
    """IoU threshold of the per-class NMS at test time."""
    detections_per_img: int = 100
    """Detections kept per image at test time (COCO evaluates 100)."""

    def __post_init__(self) -> None:
        check(self.fc_dim > 0 and self.conv_dim > 0, "model.roi.fc_dim/conv_dim", (self.fc_dim, self.conv_dim),
              "must be > 0")
        check(self.num_convs >= 0, "model.roi.num_convs", self.num_convs, "must be >= 0")
        check(self.pooler_resolution is None or self.pooler_resolution > 0, "model.roi.pooler_resolution",
              self.pooler_resolution, "must be > 0, or null for the architecture's default")
        check(self.sampling_ratio >= 0, "model.roi.sampling_ratio", self.sampling_ratio, "must be >= 0 (0 = adaptive)")
        check(self.batch_size_per_image > 0, "model.roi.batch_size_per_image", self.batch_size_per_image,
              "must be > 0")
        check(0.0 < self.positive_fraction <= 1.0, "model.roi.positive_fraction", self.positive_fraction,
              "must be in (0, 1]")
        check(0.0 <= self.bg_iou <= self.fg_iou <= 1.0, "model.roi.bg_iou/fg_iou", (self.bg_iou, self.fg_iou),
              "need 0 <= bg_iou <= fg_iou <= 1")
        check(len(self.bbox_reg_weights) == 4 and all(w > 0 for w in self.bbox_reg_weights),
              "model.roi.bbox_reg_weights", self.bbox_reg_weights, "give four weights (wx, wy, ww, wh), each > 0")
        check(0.0 <= self.score_thresh < 1.0, "model.roi.score_thresh", self.score_thresh, "must be in [0, 1)")
        check(0.0 < self.nms_thresh <= 1.0, "model.roi.nms_thresh", self.nms_thresh, "must be in (0, 1]")
        check(self.detections_per_img > 0, "model.roi.detections_per_img", self.detections_per_img, "must be > 0")


@dataclass
class MaskSpec(_Spec):
    """Mask R-CNN's mask branch (the paper's / torchvision's defaults); its RoIAlign uses `roi.sampling_ratio`
    and `roi.pooler_type`."""

    num_convs: int = 4
    """Convolutions of the mask head (4 in the paper)."""
    conv_dim: int = 256
    """Channels of the mask head's convolutions and transposed convolution (256 in the paper)."""
    norm: Norm = "none"
    """Norm of the mask head's convolutions (none in the paper, BN in torchvision's v2, GN from scratch)."""
    pooler_resolution: int = 14
    """RoIAlign output side for the mask head; the masks are twice that (28)."""

    def __post_init__(self) -> None:
        check(self.num_convs >= 0, "model.mask.num_convs", self.num_convs, "must be >= 0")
        check(self.conv_dim > 0, "model.mask.conv_dim", self.conv_dim, "must be > 0")
        check(self.pooler_resolution > 0, "model.mask.pooler_resolution", self.pooler_resolution, "must be > 0")


@dataclass
class SemanticSpec(_Spec):
    """Panoptic FPN's semantic head (semantic and panoptic_fpn tasks)."""

    conv_dims: int = 128
    """Channels of the semantic head's 3x3 convolutions (128 in Panoptic FPN)."""
    norm: Norm = "GN"
    """Norm of the semantic head's convolutions (GN in Panoptic FPN)."""
    common_stride: int = 4
    """Stride at which the levels are summed before the classifier (4: P2's)."""
    in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5")
    """FPN levels the head reads."""
    ignore_index: int = 255
    """Label ignored by the semantic loss."""
    loss_weight: float = 1.0
    """Multiplies the semantic loss (Panoptic FPN balances it against the detector's losses with 0.5)."""

    def __post_init__(self) -> None:
        check(self.conv_dims > 0, "model.semantic.conv_dims", self.conv_dims, "must be > 0")
        check(self.common_stride > 0 and self.common_stride & (self.common_stride - 1) == 0,
              "model.semantic.common_stride", self.common_stride, "must be a power of two, e.g. 4")
        check(len(self.in_features) > 0, "model.semantic.in_features", self.in_features,
              "name at least one feature, e.g. [p2, p3, p4, p5]")
        check(self.loss_weight >= 0, "model.semantic.loss_weight", self.loss_weight, "must be >= 0")


@dataclass
class InputSpec(_Spec):
    """Resizing and normalisation of the input images (the models' preprocessor)."""

    min_size: tuple[int, ...] = (800,)
    """Shorter side during training, drawn from these values per image (multi-scale if several)."""
    max_size: int = 1333
    """Longest side cap during training."""
    test_min_size: int = 800
    """Shorter side at test time."""
    test_max_size: int = 1333
    """Longest side cap at test time."""
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    """Per-channel mean subtracted from RGB images in [0, 1] (ImageNet's)."""
    pixel_std: tuple[float, ...] = IMAGENET_STD
    """Per-channel standard deviation the images are divided by (ImageNet's)."""

    def __post_init__(self) -> None:
        if isinstance(self.min_size, int) and not isinstance(self.min_size, bool):
            self.min_size = (self.min_size,)  # one size, as the Preprocessor takes it
        check(len(self.min_size) > 0 and all(s > 0 for s in self.min_size), "model.input.min_size", self.min_size,
              "give at least one size, each > 0, e.g. [800]")
        check(self.max_size > 0 and self.test_min_size > 0 and self.test_max_size > 0,
              "model.input.max_size/test_min_size/test_max_size",
              (self.max_size, self.test_min_size, self.test_max_size), "must be > 0")
        check(len(self.pixel_mean) == 3 and len(self.pixel_std) == 3 and all(s > 0 for s in self.pixel_std),
              "model.input.pixel_mean/pixel_std", (self.pixel_mean, self.pixel_std),
              "give three values each (R, G, B), the std > 0")


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


#: Every task, by name: where its :class:`~resnet_det.engine.task.Task` is declared (``"module:ATTRIBUTE"``). The
#: one place task names live: ``model.task`` is checked against it when a config loads, and the command line
#: imports the declaration from here (the task modules sit above the config, which must not import them).
#: A task of your own: :func:`register_task`.
TASKS: dict[str, str] = {
    "detection": "resnet_det.tasks.detection:DETECTION",
    "instance": "resnet_det.tasks.segmentation:INSTANCE",
    "semantic": "resnet_det.tasks.segmentation:SEMANTIC",
    "panoptic_fpn": "resnet_det.tasks.segmentation:PANOPTIC_FPN",
}


def register_task(name: str, declaration: str) -> None:
    """Makes ``model.task: <name>`` valid; ``declaration`` is ``"module:ATTRIBUTE"`` of its ``Task`` object.

    Raises:
        ValueError: ``name`` is taken by another declaration, or ``declaration`` is not ``module:ATTRIBUTE``.
    """
    if declaration.count(":") != 1 or not all(declaration.split(":")):
        raise ValueError(f"register_task: declaration must be 'module:ATTRIBUTE', got {declaration!r}")
    if TASKS.get(name, declaration) != declaration:
        raise ValueError(f"task {name!r} is already declared as {TASKS[name]!r}")
    TASKS[name] = declaration


@dataclass
class ModelSpec(_Spec):
    """The whole model: what is built, for how many classes, and each part's settings."""

    task: str = "detection"
    """A name of :data:`TASKS`: detection (Faster R-CNN), instance (+ masks: Mask R-CNN), semantic (semantic FPN),
    panoptic_fpn (both heads)."""
    arch: Literal["fpn", "c4"] = "fpn"
    """Feature pyramid on res2..res5, or the paper's C4 design (RoI head on res5 / VGG fc6-fc7)."""
    num_classes: int | None = None
    """Foreground classes (the background is added); null takes the number from the dataset."""
    weights: str | None = None
    """Full model weights (ours .safetensors/.pth, or a torchvision detection checkpoint) loaded after building."""
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    """Box regression loss of the RPN and the box head."""
    torchvision_anchor_strides: bool = False
    """Anchor strides from the padded image size as torchvision computes them (its converted checkpoints)."""
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    """The trunk."""
    fpn: FPNSpec = field(default_factory=FPNSpec)
    """The feature pyramid (arch fpn)."""
    rpn: RPNSpec = field(default_factory=RPNSpec)
    """Region proposal network."""
    roi: ROISpec = field(default_factory=ROISpec)
    """Box head on RoI features."""
    mask: MaskSpec = field(default_factory=MaskSpec)
    """Mask head (task instance)."""
    semantic: SemanticSpec = field(default_factory=SemanticSpec)
    """Semantic head (tasks semantic and panoptic_fpn)."""
    input: InputSpec = field(default_factory=InputSpec)
    """Input resizing and normalisation."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            close = difflib.get_close_matches(str(self.task), TASKS, n=2)
            check(False, "model.task", self.task, f"must be one of {sorted(TASKS)}"
                  + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        check(self.num_classes is None or self.num_classes > 0, "model.num_classes", self.num_classes,
              "must be > 0 (foreground classes), or null to take it from the dataset")

    def require_num_classes(self) -> int:
        """`num_classes` (foreground), or a `ValueError` saying how to set it when it is still None."""
        if self.num_classes is None:
            raise ValueError("model.num_classes is None: give the number of foreground classes, e.g. "
                             "spec.replace(num_classes=80) or build_faster_rcnn(num_classes=80) (the training "
                             "launcher fills it from the dataset)")
        return self.num_classes

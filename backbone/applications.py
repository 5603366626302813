"""Keras-Applications-style classifier constructors: `resnet50(include_top=True, weights=None, ...)`.

The arguments and their validation follow `keras.applications` (`ResNet50`, `ResNet50V2`, `VGG16`):
every violation raises a `ValueError` that names the argument, what was given and what is allowed.
Tensors are PyTorch's `(N, 3, H, W)`; `input_shape` may be given channels-last `(H, W, 3)` (Keras'
default) or channels-first `(3, H, W)`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Backbone, resolved_annotations, shape_str
from .layers import NormSpec, get_norm
from .resnet import ResNet
from .vgg import VGG, VGGFCHead
from .weights import LoadReport, load_weights, resolve_imagenet_weights

DEFAULT_SIZE = 224
MIN_SIZE = 32
POOLINGS = (None, "avg", "max")


def check_classifier_input(x: Tensor, channels: int, height: int | None, width: int | None,
                           min_size: int = MIN_SIZE) -> Tensor:
    """Raise a clear `ValueError` unless `x` is a `(N, channels, H, W)` batch of the declared size with
    sides >= `min_size`; returns `x` unchanged.

    Listed with `torch.fx.wrap` below: under `torch.fx` tracing (and torchvision's
    `create_feature_extractor`) it is one opaque call node that still checks when the graph runs, since a
    trace cannot branch on the tensor's rank and sides.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a (N, 3, H, W) tensor, got shape {shape_str(x)}")
    if x.shape[1] != channels:
        raise ValueError(f"expected {channels} channels in dim 1 of the (N, C, H, W) input, got shape {shape_str(x)} "
                         "(channels-last arrays must be permuted: x.permute(0, 3, 1, 2))")
    if (height is not None and x.shape[2] != height) or (width is not None and x.shape[3] != width):
        raise ValueError(f"this model was built for input_shape ({channels}, {height}, {width}); got "
                         f"({x.shape[1]}, {x.shape[2]}, {x.shape[3]})")
    if x.shape[2] < min_size or x.shape[3] < min_size:  # (an argument: TorchScript reads no int globals)
        raise ValueError(f"input sides must be at least {min_size}, got ({x.shape[2]}, {x.shape[3]})")
    return x


torch.fx.wrap("check_classifier_input")


def _check_weights(weights: str | os.PathLike | None) -> None:
    if weights is None or weights == "imagenet":
        return
    if isinstance(weights, str | os.PathLike) and Path(weights).is_file():
        return
    raise ValueError(
        f"weights={weights!r} is not allowed: use None (random initialisation), 'imagenet' (pre-training on "
        "ImageNet), or the path to an existing weights file (.pth, .pt, .safetensors)"
    )


def normalize_input_shape(input_shape: Sequence[int | None] | None, *, include_top: bool,
                          weights: str | os.PathLike | None) -> tuple[int, int | None, int | None]:
    """Validate `input_shape` the way Keras' `obtain_input_shape` does and return it channels-first.

    Returns:
        `(3, H, W)`, with `None` sides when the model accepts any size.
    """
    default = (3, DEFAULT_SIZE, DEFAULT_SIZE)
    if input_shape is None:
        if include_top and weights == "imagenet":
            return default
        return (3, None, None)
    if isinstance(input_shape, str) or not isinstance(input_shape, Sequence) or len(input_shape) != 3:
        raise ValueError(f"input_shape={input_shape!r} must be a tuple of three integers: (H, W, 3) channels-last "
                         "or (3, H, W) channels-first")
    for v in input_shape:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"input_shape={tuple(input_shape)!r} must hold positive integers "
                             "(or None for a free side)")
    if input_shape[-1] == 3:
        shape = (3, input_shape[0], input_shape[1])
    elif input_shape[0] == 3:
        shape = (3, input_shape[1], input_shape[2])
    else:
        raise ValueError(f"input_shape={tuple(input_shape)!r} must have exactly 3 channels, as (H, W, 3) or (3, H, W)")
    if include_top and weights == "imagenet" and shape != default:
        raise ValueError(f"input_shape={tuple(input_shape)!r}: when include_top=True and weights='imagenet', the "
                         f"input must be 224x224 with 3 channels, i.e. (224, 224, 3) or (3, 224, 224)")
    for side in shape[1:]:
        if side is not None and side < MIN_SIZE:
            raise ValueError(f"input_shape={tuple(input_shape)!r}: height and width must be at least {MIN_SIZE}")
    if include_top and None in shape:
        raise ValueError(f"input_shape={tuple(input_shape)!r}: include_top=True needs a static input shape "
                         "(no None sides)")
    return shape  # type: ignore[return-value]


def validate_keras_args(*, include_top: bool, weights: str | os.PathLike | None,
                        input_shape: Sequence[int | None] | None, pooling: str | None,
                        classes: int) -> tuple[int, int | None, int | None]:
    """All Keras Applications rules, in Keras' order. Returns the channels-first input shape."""
    if not isinstance(include_top, bool):
        raise ValueError(f"include_top={include_top!r} must be True or False")
    _check_weights(weights)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"classes={classes!r} must be a positive integer")
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(f"classes={classes}: when weights='imagenet' and include_top=True, classes must be 1000 "
                         "(use include_top=False to put your own head on the ImageNet features)")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not allowed: use None (the 4D map of the last block), 'avg' or "
                         "'max' (with include_top=False)")
    return normalize_input_shape(input_shape, include_top=include_top, weights=weights)


class ImageClassifier(nn.Module):
    """A backbone and the Keras-style top: logits, pooled features, or the last 4D map.

    Attributes:
        body: the multi-stage `Backbone` (its `res2..res5`/`conv*` outputs serve detectors too).
        head_norm: the final BN+ReLU of pre-activation nets (None otherwise).
        fc_head: VGG's fc6/fc7 (None for ResNets).
        fc: the classifier (None without top).

    Forward: `(N, 3, H, W)` -> `(N, classes)` logits with the top; without it `(N, C)` when pooling,
    else the `(N, C, H/32, W/32)` map.
    """

    __jit_unused_properties__ = ("backbone",)  # TorchScript: a Python-side alias, not used by forward

    def __init__(self, body: Backbone, *, include_top: bool = True, pooling: str | None = None, classes: int = 1000,
                 input_shape: tuple[int, int | None, int | None] = (3, None, None), head_norm: nn.Module | None = None,
                 fc_head: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.feature_name = body.out_features[-1]
        channels = body.output_shape()[self.feature_name].channels
        self.head_norm = head_norm
        self.include_top, self.pooling, self.input_shape = include_top, pooling, input_shape
        self.fc_head = fc_head if include_top else None
        self.fc: nn.Linear | None = None
        if include_top:
            in_features = fc_head.out_channels if fc_head is not None else channels
            self.fc = nn.Linear(in_features, classes)
            nn.init.normal_(self.fc.weight, 0, 0.01)
            nn.init.zeros_(self.fc.bias)
        self.num_features = channels

    @property
    def backbone(self) -> Backbone:
        return self.body

    def _check_input(self, x: Tensor) -> Tensor:
        c, h, w = self.input_shape
        return check_classifier_input(x, c, h, w)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last 4D map (after the final BN+ReLU of v2 nets)."""
        x = self._check_input(x)
        x = self.body(x)[self.feature_name]
        if self.head_norm is not None:
            x = F.relu(self.head_norm(x))
        return x

    @resolved_annotations
    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        if self.include_top:
            if self.fc_head is not None:  # VGG: torchvision's adaptive 7x7 pooling, then fc6/fc7
                x = self.fc_head(F.adaptive_avg_pool2d(x, (7, 7)))
            else:
                x = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.fc(x)
        if self.pooling == "avg":
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.pooling == "max":
            return F.adaptive_max_pool2d(x, 1).flatten(1)
        return x


def _finish(model: ImageClassifier, arch: str, weights: str | os.PathLike | None) -> ImageClassifier:
    if weights is not None:
        path = resolve_imagenet_weights(arch) if weights == "imagenet" else weights
        model.load_report: LoadReport = load_weights(model, path, strict=True)
    return model


def _resnet_app(arch: str, depth: int, preact: bool, include_top: bool, weights, input_shape, pooling, classes,
                norm: NormSpec, **kwargs) -> ImageClassifier:
    shape = validate_keras_args(include_top=include_top, weights=weights, input_shape=input_shape, pooling=pooling,
                                classes=classes)
    body = ResNet(depth, preact=preact, out_features=("res5",), norm=norm, **kwargs)
    head_norm = get_norm(norm, body.output_shape()["res5"].channels) if preact else None
    model = ImageClassifier(body, include_top=include_top, pooling=pooling, classes=classes, input_shape=shape,
                            head_norm=head_norm)
    return _finish(model, arch, weights)


def _make_resnet(depth: int, preact: bool):
    arch = f"resnet{depth}{'v2' if preact else ''}"

    def constructor(include_top: bool = True, weights: str | os.PathLike | None = None,
                    input_shape: Sequence[int | None] | None = None, pooling: str | None = None, classes: int = 1000,
                    *, norm: NormSpec = "BN", **kwargs) -> ImageClassifier:
        return _resnet_app(arch, depth, preact, include_top, weights, input_shape, pooling, classes, norm, **kwargs)

    constructor.__name__ = constructor.__qualname__ = arch
    constructor.__doc__ = (
        f"ResNet-{depth}{' v2 (pre-activation)' if preact else ''} classifier, Keras-Applications style.\n\n"
        "Args:\n"
        "    include_top: add global average pooling and the `classes`-way fully connected layer.\n"
        "    weights: None (random), 'imagenet' (from the torchvision/timm cache, downloaded when online), "
        "or a file path (torchvision, timm or this project's layout).\n"
        "    input_shape: (H, W, 3) or (3, H, W); sides >= 32; must be 224x224 with the top and ImageNet weights.\n"
        "    pooling: with include_top=False: None (4D map), 'avg' or 'max'.\n"
        "    classes: number of classes (1000 with the top and ImageNet weights).\n"
        "    norm, **kwargs: passed to `backbone.ResNet` (e.g. freeze_at, stride_in_1x1, width).\n"
    )
    return constructor


resnet18 = _make_resnet(18, False)
resnet34 = _make_resnet(34, False)
resnet50 = _make_resnet(50, False)
resnet101 = _make_resnet(101, False)
resnet152 = _make_resnet(152, False)
resnet50v2 = _make_resnet(50, True)
resnet101v2 = _make_resnet(101, True)
resnet152v2 = _make_resnet(152, True)


def _vgg_app(arch: str, norm: NormSpec, include_top, weights, input_shape, pooling, classes,
             **kwargs) -> ImageClassifier:
    shape = validate_keras_args(include_top=include_top, weights=weights, input_shape=input_shape, pooling=pooling,
                                classes=classes)
    body = VGG(out_features=("pool5",), norm=norm, **kwargs)
    fc_head = VGGFCHead(body.output_shape()["pool5"].channels) if include_top else None
    model = ImageClassifier(body, include_top=include_top, pooling=pooling, classes=classes, input_shape=shape,
                            fc_head=fc_head)
    return _finish(model, arch, weights)


def vgg16(include_top: bool = True, weights: str | os.PathLike | None = None,
          input_shape: Sequence[int | None] | None = None, pooling: str | None = None, classes: int = 1000,
          **kwargs) -> ImageClassifier:
    """VGG-16 classifier, Keras-Applications style (same arguments and rules as `resnet50`)."""
    return _vgg_app("vgg16", "none", include_top, weights, input_shape, pooling, classes, **kwargs)


def vgg16_bn(include_top: bool = True, weights: str | os.PathLike | None = None,
             input_shape: Sequence[int | None] | None = None, pooling: str | None = None, classes: int = 1000,
             **kwargs) -> ImageClassifier:
    """VGG-16 with batch norm, Keras-Applications style."""
    return _vgg_app("vgg16_bn", "BN", include_top, weights, input_shape, pooling, classes, **kwargs)


APPLICATIONS = {
    f.__name__: f
    for f in (resnet18, resnet34, resnet50, resnet101, resnet152, resnet50v2, resnet101v2, resnet152v2, vgg16, vgg16_bn)
}

"""ResNet (v1, v2, plain, CIFAR-style) and VGG-16 backbones with multi-stage outputs, FPN, weight import.

Quick tour::

    from backbone import build_backbone, FPN, resnet50
    trunk = build_backbone("resnet101", out_features=("res2", "res3", "res4", "res5"), freeze_at=2,
                           norm="FrozenBN")
    fpn = FPN(trunk)                      # p2..p6, 256 channels, strides 4..64
    fpn.output_shape()                    # {"p2": ShapeSpec(channels=256, stride=4), ...}
    clf = resnet50(include_top=False, weights="imagenet", pooling="avg")   # Keras-style
"""

from .applications import (
    APPLICATIONS,
    ImageClassifier,
    resnet18,
    resnet34,
    resnet50,
    resnet50v2,
    resnet101,
    resnet101v2,
    resnet152,
    resnet152v2,
    vgg16,
    vgg16_bn,
)
from .base import Backbone, FeatureInfo
from .fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from .interop import FromTorchvision, TimmBackbone, TorchvisionBackbone, from_torchvision
from .layers import Conv2d, FrozenBatchNorm2d, fold_frozen_batchnorm, get_norm
from .registry import BACKBONES, NECKS, build_backbone, build_neck, register_backbone, register_neck
from .resnet import CifarResNet, ResNet, count_trainable
from .shape_spec import ShapeSpec
from .timm_plugin import TimmClassifier, register_timm_models, timm_name
from .vgg import VGG, VGGFCHead
from .weights import (
    LoadReport,
    WeightsError,
    load_weights,
    read_state_dict,
    resolve_imagenet_weights,
    save_safetensors,
)

__all__ = [
    "APPLICATIONS",
    "BACKBONES",
    "FPN",
    "NECKS",
    "VGG",
    "Backbone",
    "CifarResNet",
    "Conv2d",
    "FeatureInfo",
    "FromTorchvision",
    "FrozenBatchNorm2d",
    "ImageClassifier",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "LoadReport",
    "ResNet",
    "ShapeSpec",
    "TimmBackbone",
    "TimmClassifier",
    "TorchvisionBackbone",
    "VGGFCHead",
    "WeightsError",
    "build_backbone",
    "build_neck",
    "count_trainable",
    "fold_frozen_batchnorm",
    "from_torchvision",
    "get_norm",
    "load_weights",
    "read_state_dict",
    "register_backbone",
    "register_neck",
    "register_timm_models",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet50v2",
    "resnet101",
    "resnet101v2",
    "resnet152",
    "resnet152v2",
    "resolve_imagenet_weights",
    "save_safetensors",
    "timm_name",
    "vgg16",
    "vgg16_bn",
]

# The one import-time effect: our backbones become timm models named "resnetdet_<name>", so code that
# asks timm for a backbone by name (smp "tu-", transformers, effdet) can use them. Idempotent.
register_timm_models()

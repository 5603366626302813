"""One plain-dict registry of every backbone and neck, and builders by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial
from typing import Any

from .base import Backbone
from .fpn import FPN
from .resnet import CIFAR_DEPTHS, RESNET_DEPTHS, CifarResNet, ResNet
from .vgg import VGG

BACKBONES: dict[str, Callable[..., Backbone]] = {}
NECKS: dict[str, Callable[..., Backbone]] = {}


def _register(table: dict[str, Callable[..., Backbone]], name: str, fn: Callable[..., Backbone]) -> None:
    if name in table:
        raise KeyError(f"{name!r} is already registered; pick another name")
    table[name] = fn


def register_backbone(name: str, fn: Callable[..., Backbone]) -> None:
    """Add `fn(**kwargs) -> Backbone` under `name`; a duplicate name raises `KeyError`."""
    _register(BACKBONES, name, fn)


def register_neck(name: str, fn: Callable[..., Backbone]) -> None:
    """Add `fn(bottom_up, **kwargs) -> Backbone` under `name`; a duplicate name raises `KeyError`."""
    _register(NECKS, name, fn)


def _unknown(kind: str, name: str, table: dict[str, Any]) -> ValueError:
    close = difflib.get_close_matches(name, table, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Registered: {', '.join(sorted(table))}")


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """Build a registered backbone, e.g. `build_backbone("resnet101", out_features=("res4",), freeze_at=2)`."""
    if name not in BACKBONES:
        raise _unknown("backbone", name, BACKBONES)
    return BACKBONES[name](**kwargs)


def build_neck(name: str, bottom_up: Backbone, **kwargs: Any) -> Backbone:
    """Build a registered neck on `bottom_up`, e.g. `build_neck("fpn", build_backbone("resnet50"))`."""
    if name not in NECKS:
        raise _unknown("neck", name, NECKS)
    return NECKS[name](bottom_up, **kwargs)


for _d in RESNET_DEPTHS:
    register_backbone(f"resnet{_d}", partial(ResNet, _d))
    register_backbone(f"plain{_d}", partial(ResNet, _d, shortcut=False))
for _d in (50, 101, 152):
    register_backbone(f"resnet{_d}v2", partial(ResNet, _d, preact=True))
for _d in CIFAR_DEPTHS:
    register_backbone(f"cifar_resnet{_d}", partial(CifarResNet, _d))
    register_backbone(f"cifar_plain{_d}", partial(CifarResNet, _d, shortcut=False))
register_backbone("vgg16", partial(VGG, norm="none"))
register_backbone("vgg16_bn", partial(VGG, norm="BN"))

register_neck("fpn", partial(FPN, top_block="maxpool"))
register_neck("fpn_p6p7", partial(FPN, top_block="p6p7"))
register_neck("fpn_no_top", partial(FPN, top_block="none"))

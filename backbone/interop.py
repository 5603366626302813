"""Adapters between our backbones and torchvision / timm.

- `TorchvisionBackbone`: gives our backbone (usually an FPN) the `out_channels` attribute and output
  names that torchvision's `FasterRCNN`, `MaskRCNN` and `RetinaNet` expect.
- `TimmBackbone`: makes any timm `features_only` model a `Backbone` of ours with declared shapes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from .base import Backbone
from .shape_spec import ShapeSpec


class TorchvisionBackbone(nn.Module):
    """Wrap a `Backbone` for torchvision's detection models.

    torchvision's detectors read one `out_channels` integer and, by default, pool RoIs from the
    features named "0", "1", "2", "3" (and anchor on a fifth, "pool"). With `rename=True` our
    `p2..p5` become "0".."3" and an extra top level becomes "pool", so the defaults of
    `torchvision.models.detection.FasterRCNN` work unchanged.

    Args:
        backbone: any of our backbones whose outputs all have the same channel count.
        rename: use torchvision's feature names instead of ours.
    """

    def __init__(self, backbone: Backbone, *, rename: bool = True) -> None:
        super().__init__()
        shapes = backbone.output_shape()
        channels = {s.channels for s in shapes.values()}
        if len(channels) != 1:
            raise ValueError(f"torchvision detectors need every feature map to have the same channels; got "
                             f"{ {k: s.channels for k, s in shapes.items()} }. Put an FPN on the trunk, or select "
                             "one output with out_features")
        self.body = backbone
        self.out_channels = channels.pop()
        names = list(shapes)
        if rename:
            extra = getattr(getattr(backbone, "top_block", None), "num_levels", 0)
            n_main = len(names) - extra
            new = [str(i) for i in range(n_main)] + (["pool"] if extra == 1 else [f"p{i}" for i in range(extra)])
            self.names = dict(zip(names, new))
        else:
            self.names = {n: n for n in names}

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x)
        return OrderedDict((self.names[k], v) for k, v in feats.items())


class TimmBackbone(Backbone):
    """A timm model created with `features_only=True`, as one of our backbones.

    Outputs are named by stride like ours: stride 2 -> "stem" ... stride 4 -> "res2", 8 -> "res3",
    16 -> "res4", 32 -> "res5", so FPN and detector configs do not change when the trunk does.

    Args:
        model: a timm model name (created with `pretrained=False` unless `pretrained=True`) or an
            already-built `features_only` model.
        out_indices: passed to timm when `model` is a name.
    """

    def __init__(self, model: str | nn.Module, *, out_indices: Sequence[int] | None = None,
                 pretrained: bool = False, **kwargs) -> None:
        super().__init__()
        if isinstance(model, str):
            import timm

            create_kwargs = dict(features_only=True, pretrained=pretrained, **kwargs)
            if out_indices is not None:
                create_kwargs["out_indices"] = tuple(out_indices)
            model = timm.create_model(model, **create_kwargs)
        info = getattr(model, "feature_info", None)
        if info is None or not hasattr(info, "channels"):
            raise TypeError(f"{type(model).__name__} has no timm feature_info; create it with features_only=True")
        self.model = model
        names = []
        shapes: dict[str, ShapeSpec] = {}
        for ch, red in zip(info.channels(), info.reduction()):
            level = round(math.log2(red))
            name = "stem" if level <= 1 else f"res{level}"
            if name in shapes:
                name = f"{name}_{len(shapes)}"
            names.append(name)
            shapes[name] = ShapeSpec(int(ch), int(red))
        self._out_feature_shapes = shapes
        self._out_features = tuple(names)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.model(x)
        return dict(zip(self._out_features, feats))


class FromTorchvision(Backbone):
    """A torchvision feature extractor (e.g. `BackboneWithFPN` from `resnet_fpn_backbone`, or an
    `IntermediateLayerGetter`) as one of our backbones.

    Channels and strides are measured once at construction with a probe forward pass (torchvision
    does not declare strides); outputs are renamed by stride: `p<k>` for stride `2**k` (FPN outputs)
    or `res<k>` (trunk outputs, `fpn=False`).

    Args:
        module: returns an ordered dict of `(N, C, H, W)` maps.
        fpn: name outputs `p<k>` (True) or `res<k>` (False).
        probe_size: side of the probe input (a multiple of the largest stride).
    """

    def __init__(self, module: nn.Module, *, fpn: bool = True, probe_size: int = 256) -> None:
        super().__init__()
        import torch

        self.body = module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            feats = module(torch.zeros(1, 3, probe_size, probe_size))
        module.train(was_training)
        if not isinstance(feats, dict) or not feats:
            raise TypeError(f"{type(module).__name__} must return a non-empty dict of feature maps")
        shapes: dict[str, ShapeSpec] = {}
        self._rename: dict[str, str] = {}
        for key, t in feats.items():
            stride = probe_size // t.shape[-1]
            level = round(math.log2(stride))
            name = f"{'p' if fpn else 'res'}{level}"
            if name in shapes:
                raise ValueError(f"two outputs of {type(module).__name__} have stride {stride}")
            self._rename[key] = name
            shapes[name] = ShapeSpec(int(t.shape[1]), 2**level)
        self._out_feature_shapes = shapes
        self._out_features = tuple(shapes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {self._rename[k]: v for k, v in self.body(x).items()}


def from_torchvision(module: nn.Module, *, fpn: bool = True) -> FromTorchvision:
    """Wrap a torchvision backbone (with or without FPN) as one of ours; see `FromTorchvision`."""
    return FromTorchvision(module, fpn=fpn)

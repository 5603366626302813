"""Feature Pyramid Network (Lin et al. 2017) on top of any `Backbone`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Backbone, resolved_annotations
from .layers import Conv2d, NormSpec, check_norm, get_norm
from .shape_spec import ShapeSpec

TOP_BLOCKS = ("maxpool", "p6p7", "none")


def _xavier_fill(conv: nn.Conv2d) -> None:
    # "c2_xavier_fill" of Detectron = kaiming uniform with a=1; torchvision's FPN uses the same.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class LastLevelMaxPool(nn.Module):
    """P6 as a stride-2 subsampling of P5 (Faster R-CNN FPN): max pool with kernel 1, stride 2."""

    num_levels = 1
    in_feature = "p5"

    def forward(self, p5: Tensor, c5: Tensor) -> list[Tensor]:
        return [F.max_pool2d(p5, kernel_size=1, stride=2, padding=0)]


class LastLevelP6P7(nn.Module):
    """P6 and P7 by stride-2 3x3 convolutions (RetinaNet), from C5 (`in_feature="res5"`) or P5."""

    num_levels = 2

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "p5") -> None:
        super().__init__()
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            _xavier_fill(conv)

    def forward(self, p5: Tensor, c5: Tensor) -> list[Tensor]:
        p6 = self.p6(p5 if self.in_feature == "p5" else c5)
        return [p6, self.p7(F.relu(p6))]


class FPN(Backbone):
    """FPN: lateral 1x1 + top-down nearest upsampling + 3x3 output convs, plus an optional top block.

    Args:
        bottom_up: the trunk; its `output_shape()` gives in-channels and strides.
        in_features: names of the trunk outputs to use, high to low resolution (default: all of
            them). Their strides must double from one to the next (checked here).
        out_channels: channels of every pyramid level (256 in the paper).
        norm: norm after the lateral and output convs ("none" in the paper, "BN" in torchvision's v2).
        top_block: "maxpool" (P6 for Faster R-CNN), "p6p7" (RetinaNet) or "none".
        top_block_in: for "p6p7", "p5" or the last trunk feature (e.g. "res5").

    Outputs are named `p<k>` with stride `2**k`: P2..P5 (+P6, P7) for a ResNet's res2..res5.
    """

    def __init__(self, bottom_up: Backbone, *, in_features: Sequence[str] | None = None, out_channels: int = 256,
                 norm: NormSpec = "none", top_block: str = "maxpool", top_block_in: str = "p5") -> None:
        super().__init__()
        if not isinstance(bottom_up, Backbone):
            raise TypeError(f"bottom_up must be a backbone.Backbone, got {type(bottom_up).__name__}; wrap other "
                            "models with backbone.interop.TimmBackbone or a Backbone subclass")
        check_norm(norm)
        if top_block not in TOP_BLOCKS:
            raise ValueError(f"top_block={top_block!r}; choose one of {TOP_BLOCKS}")
        in_shapes = bottom_up.output_shape()
        in_features = tuple(in_features) if in_features is not None else tuple(in_shapes)
        missing = [f for f in in_features if f not in in_shapes]
        if missing:
            raise ValueError(f"FPN in_features {missing} are not outputs of the bottom-up backbone, whose outputs "
                             f"are {tuple(in_shapes)}; build it with out_features including them")
        strides = [in_shapes[f].stride for f in in_features]
        for s in strides:
            if s < 1 or 2 ** round(math.log2(s)) != s:
                raise ValueError(f"FPN needs power-of-two strides, got {dict(zip(in_features, strides))}")
        for a, b in itertools.pairwise(strides):
            if b != 2 * a:
                raise ValueError(f"FPN in_features must have strides that double level to level (log2-contiguous), "
                                 f"got {dict(zip(in_features, strides))}")
        self.bottom_up = bottom_up
        self.in_features = in_features
        use_bias = norm in (None, "none", "")
        self.lateral = nn.ModuleList()
        self.output = nn.ModuleList()
        for f in in_features:
            c = in_shapes[f].channels
            lat = Conv2d(c, out_channels, 1, bias=use_bias, norm=get_norm(norm, out_channels))
            out = Conv2d(out_channels, out_channels, 3, padding=1, bias=use_bias, norm=get_norm(norm, out_channels))
            _xavier_fill(lat)
            _xavier_fill(out)
            self.lateral.append(lat)
            self.output.append(out)
        shapes = {f"p{round(math.log2(s))}": ShapeSpec(out_channels, s) for s in strides}
        self.top_block: nn.Module | None = None
        if top_block == "maxpool":
            self.top_block = LastLevelMaxPool()
        elif top_block == "p6p7":
            if top_block_in == "p5":
                in_ch = out_channels
            elif top_block_in == in_features[-1]:
                in_ch = in_shapes[top_block_in].channels
            else:
                raise ValueError(f"top_block_in={top_block_in!r}; use 'p5' or the last in_feature "
                                 f"{in_features[-1]!r}")
            self.top_block = LastLevelP6P7(in_ch, out_channels, "p5" if top_block_in == "p5" else "c5")
        if self.top_block is not None:
            s = strides[-1]
            for _ in range(self.top_block.num_levels):
                s *= 2
                shapes[f"p{round(math.log2(s))}"] = ShapeSpec(out_channels, s)
        self._out_feature_shapes = shapes
        self._out_features = tuple(shapes)
        self._out_feature_names = list(shapes)  # for the scripted forward
        self._size_divisibility = max(strides)
        self.out_channels = out_channels

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @resolved_annotations
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Args: x: `(N, 3, H, W)`. Returns: `{"p2": .., "p6": ..}`, each `(N, out_channels, H/s, W/s)`."""
        feats = self.bottom_up(x)
        inputs = [feats[f] for f in self.in_features]
        if torch.jit.is_scripting():
            results = self._top_down_scripted(inputs)
        else:
            last_inner = self.lateral[-1](inputs[-1])
            results = [self.output[-1](last_inner)]
            for i in range(len(inputs) - 2, -1, -1):
                # Upsample to the lateral's exact size (not a fixed x2) so inputs of any size work.
                top_down = F.interpolate(last_inner, size=inputs[i].shape[-2:], mode="nearest")
                conv = self.lateral[i]
                if isinstance(conv, Conv2d) and conv.fused_inference and conv.can_fuse(inputs[i]):
                    last_inner = conv.forward_fused(inputs[i], add=top_down)  # CPU inference: conv + add at once
                else:
                    # The lateral conv's output is a fresh tensor (autograd needs neither it nor top_down): add in
                    # place, one full-resolution allocation fewer per level.
                    last_inner = conv(inputs[i]).add_(top_down)
                results.insert(0, self.output[i](last_inner))
        if self.top_block is not None:
            results.extend(self.top_block(results[-1], inputs[-1]))
        if torch.jit.is_scripting():  # TorchScript zips no tuple attribute: the names as a list
            out: dict[str, Tensor] = {}
            for i, name in enumerate(self._out_feature_names):
                out[name] = results[i]
            return out
        return dict(zip(self._out_features, results))

    def _top_down_scripted(self, inputs: list[Tensor]) -> list[Tensor]:
        """The top-down pass as TorchScript compiles it: the same function as the eager loop of `forward`, without
        the fused CPU path. TorchScript indexes a `ModuleList` only with literals, so each level's lateral and
        output convolutions are run by enumerating the lists; levels are visited from the coarsest."""
        n = len(inputs)
        laterals: list[Tensor] = []
        for i, conv in enumerate(self.lateral):
            laterals.append(conv(inputs[i]))
        inners: list[Tensor] = [laterals[n - 1]]
        for i in range(n - 2, -1, -1):
            top_down = F.interpolate(inners[0], size=[inputs[i].shape[-2], inputs[i].shape[-1]], mode="nearest")
            inners.insert(0, laterals[i] + top_down)
        results: list[Tensor] = []
        for i, conv in enumerate(self.output):
            results.append(conv(inners[i]))
        return results

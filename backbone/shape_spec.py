"""`ShapeSpec`: what a backbone or neck declares about each of its outputs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride of one feature map.

    Attributes:
        channels: number of channels `C` of the `(N, C, H, W)` map.
        stride: ratio between the input side and the map side (4 means `H_out = ceil(H / 4)` for a
            ResNet, `H / 4` exactly when the input is padded to the backbone's `size_divisibility`).
    """

    channels: int
    stride: int

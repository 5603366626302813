"""VGG-16 (Simonyan & Zisserman 2014) as a detection backbone, with and without BN.

Outputs are named after the last convolution of each block: `conv1` (conv1_2, stride 1) .. `conv5`
(conv5_3, stride 16: the map the paper's VGG-16 Faster R-CNN pools its RoIs from), and `pool5`
(stride 32). The default `("conv3", "conv4", "conv5", "pool5")` gives strides 4, 8, 16, 32, the same
pyramid an FPN takes from a ResNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Backbone, check_image_batch, resolved_annotations
from .layers import Conv2d, FrozenBatchNorm2d, NormSpec, check_norm, get_norm
from .shape_spec import ShapeSpec

# Convolutions per block and their width: configuration "D" of the VGG paper.
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
VGG_OUTPUTS = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")
VGG_FC_HIDDEN = 4096  # width of fc6 and fc7

torch.fx.wrap("check_image_batch")  # an opaque, still-checking call under torch.fx tracing (see base.py)


class VGG(Backbone):
    """VGG-16 trunk with multi-stage outputs.

    Args:
        out_features: subset of ("conv1", .., "conv5", "pool5"); default ("conv3", "conv4", "conv5",
            "pool5"). Layers after the last one requested are not built.
        norm: "none" for the original VGG-16, "BN" (VGG-16-BN), "FrozenBN", "GN", "SyncBN", or a callable.
        freeze_at: 0 = nothing frozen, k = blocks 1..k frozen (the paper's Faster R-CNN fine-tunes
            from conv3_1 up, i.e. `freeze_at=2`).
        width: channels of the first block (64 in the paper; smaller for cheap tests).
    """

    def __init__(self, *, out_features: Sequence[str] | None = None, norm: NormSpec = "none", freeze_at: int = 0,
                 width: int = 64, in_channels: int = 3, blocks: Sequence[tuple[int, int]] = VGG16_BLOCKS) -> None:
        super().__init__()
        check_norm(norm)
        self.norm_name = norm
        self._out_features = self._select_out_features(out_features, VGG_OUTPUTS, ("conv3", "conv4", "conv5", "pool5"))
        last = VGG_OUTPUTS.index(self._out_features[-1])
        scale = width / 64
        shapes: dict[str, ShapeSpec] = {}
        in_ch, stride = in_channels, 1
        block_names: list[str] = []  # (a local: TorchScript warns on annotated empty attributes)
        for b, (n_convs, ch) in enumerate(blocks[: min(last + 1, 5)], start=1):
            ch = max(1, round(ch * scale))
            layers = []
            if b > 1:
                # The pooling that precedes block b belongs to it, so "conv<b>" is the block's output.
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                stride *= 2
            for _i in range(1, n_convs + 1):
                layers.append(Conv2d(in_ch, ch, 3, padding=1, bias=True, norm=get_norm(norm, ch),
                                     activation=nn.ReLU(inplace=True)))
                in_ch = ch
            block = nn.Sequential(*layers)
            self.add_module(f"block{b}", block)
            block_names.append(f"block{b}")
            shapes[f"conv{b}"] = ShapeSpec(ch, stride)
        if last == 5:
            self.pool5 = nn.MaxPool2d(kernel_size=2, stride=2)
            shapes["pool5"] = ShapeSpec(in_ch, stride * 2)
        self.block_names = block_names
        self._out_feature_shapes = shapes
        self.out_channels_last = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Freeze blocks 1..freeze_at (no gradients; BN becomes frozen BN)."""
        n = len(self.block_names)
        if isinstance(freeze_at, bool) or not isinstance(freeze_at, int) or not 0 <= freeze_at <= n:
            raise ValueError(f"freeze_at={freeze_at!r} is out of range for this VGG: "
                             f"use 0..{n} (k freezes blocks 1..k)")
        for name in self.block_names[:freeze_at]:
            module = getattr(self, name)
            for p in module.parameters():
                p.requires_grad_(False)
            setattr(self, name, FrozenBatchNorm2d.convert(module))
        self.freeze_at = freeze_at

    def truncate(self, last: str) -> None:
        """Drop every layer after output `last`, in place (``"conv4"``: block5 and pool5 go); the outputs
        after it are deselected (``(last,)`` if none is left). Weights of the kept layers are untouched.

        Raises:
            ValueError: `last` is not an output this VGG has built.
        """
        if last not in self._out_feature_shapes:
            raise ValueError(f"truncate({last!r}): this VGG builds {tuple(self._out_feature_shapes)}")
        keep = VGG_OUTPUTS[: VGG_OUTPUTS.index(last) + 1]
        for name in self.block_names[len(keep):]:
            delattr(self, name)
        self.block_names = self.block_names[: len(keep)]
        if "pool5" not in keep and hasattr(self, "pool5"):
            del self.pool5
        self._out_feature_shapes = {n: s for n, s in self._out_feature_shapes.items() if n in keep}
        self._out_features = tuple(n for n in self._out_features if n in keep) or (last,)

    @resolved_annotations
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Args: x: `(N, 3, H, W)`. Returns: the selected maps (`conv<k>` after the block's last ReLU)."""
        x = check_image_batch(x, "VGG")
        outputs: dict[str, Tensor] = {}
        # named_children, not getattr(self, name): TorchScript takes only literal getattr names (children are
        # in registration order: block1..block5, pool5)
        for name, module in self.named_children():
            if name in self.block_names:
                x = module(x)
                if "conv" + name[5:] in self._out_features:  # block<k> gives conv<k>
                    outputs["conv" + name[5:]] = x
            elif name == "pool5":
                outputs["pool5"] = module(x)  # built only when selected
        return outputs


class VGGFCHead(nn.Module):
    """fc6 and fc7 of VGG-16 (4096 each, ReLU and dropout): the classifier trunk, and the per-RoI box
    head of the paper's VGG-16 Faster R-CNN (on 7x7 RoI-pooled conv5_3 features).

    Input: `(N, C, 7, 7)` (flattened inside). Output: `(N, hidden)`.
    """

    def __init__(self, in_channels: int = 512, resolution: int = 7, hidden: int = VGG_FC_HIDDEN,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels * resolution * resolution, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out_channels = hidden
        for fc in (self.fc6, self.fc7):
            nn.init.normal_(fc.weight, 0, 0.01)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        x = self.dropout(nn.functional.relu(self.fc6(x)))
        return self.dropout(nn.functional.relu(self.fc7(x)))

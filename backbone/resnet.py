"""ResNet v1 (He et al. 2015), pre-activation ResNet v2 (He et al. 2016), their plain twins, and the
CIFAR-style ResNet/plain nets of the paper's section 4.2.

Every network is a `Backbone`: `forward` returns an ordered dict of the requested stages
(`stem`, `res2`..`res5`) and `output_shape()` declares their channels and strides, computed while the
stages are built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Backbone, check_image_batch, resolved_annotations
from .layers import Conv2d, FrozenBatchNorm2d, NormSpec, c2_msra_fill, check_norm, get_norm
from .shape_spec import ShapeSpec

# Variants are data: block type and blocks per stage (res2..res5). Table 1 of the paper.
RESNET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# CIFAR-style nets have 6n+2 layers: 3 stages of n basic blocks with 16/32/64 channels.
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
STAGE_NAMES = ("res2", "res3", "res4", "res5")

torch.fx.wrap("check_image_batch")  # an opaque, still-checking call under torch.fx tracing (see base.py)


def _relu(x: Tensor) -> Tensor:
    return F.relu(x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34 and CIFAR nets). `shortcut=False` gives the plain twin."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm: NormSpec = "BN",
                 shortcut: bool = True, shortcut_type: str = "B") -> None:
        super().__init__()
        self.use_shortcut = shortcut
        self.pad_shortcut = 0
        self.shortcut_stride = stride
        self.shortcut: nn.Module | None = None
        if shortcut and (stride != 1 or in_channels != out_channels):
            if shortcut_type == "B":  # projection: 1x1 conv + norm
                self.shortcut = Conv2d(in_channels, out_channels, 1, stride=stride, bias=False,
                                       norm=get_norm(norm, out_channels))
            else:  # "A": parameter-free identity, subsampled and zero-padded (the paper's CIFAR nets)
                self.pad_shortcut = out_channels - in_channels
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False,
                            norm=get_norm(norm, out_channels), activation=nn.ReLU(inplace=True))
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, bias=False,
                            norm=get_norm(norm, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        projected_or_identity = self.shortcut is not None or (not self.pad_shortcut and self.shortcut_stride == 1)
        # (not one `and`: TorchScript prunes only a whole `if not torch.jit.is_scripting()` block, uncompiled)
        if not torch.jit.is_scripting():  # noqa: SIM102 - the eager-only fused path
            if self.use_shortcut and projected_or_identity and self.conv2.fused_inference and self.conv2.can_fuse(x):
                # CPU inference after folding: conv2 + bias + shortcut + ReLU as one kernel (see Conv2d)
                sc = self.shortcut(x) if self.shortcut is not None else x
                return self.conv2.forward_fused(self.conv1(x), add=sc, relu=True)
        out = self.conv2(self.conv1(x))  # a fresh tensor: the in-place add and ReLU below are safe
        if self.use_shortcut:
            if self.shortcut is not None:
                out += self.shortcut(x)
            elif self.shortcut_stride != 1 or self.pad_shortcut:
                sc = x[:, :, :: self.shortcut_stride, :: self.shortcut_stride]
                half = self.pad_shortcut // 2
                out += F.pad(sc, (0, 0, 0, 0, half, self.pad_shortcut - half))
            else:
                out += x
        return out.relu_()


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 with expansion 4 (ResNet-50/101/152).

    The stride sits on the 3x3 convolution as torchvision and detectron2 place it ("ResNet v1.5");
    `stride_in_1x1=True` puts it on the first 1x1 as in the original paper and Caffe models.
    """

    def __init__(self, in_channels: int, out_channels: int, *, bottleneck_channels: int, stride: int = 1,
                 norm: NormSpec = "BN", shortcut: bool = True, stride_in_1x1: bool = False) -> None:
        super().__init__()
        self.use_shortcut = shortcut
        self.shortcut: nn.Module | None = None
        if shortcut and (stride != 1 or in_channels != out_channels):
            self.shortcut = Conv2d(in_channels, out_channels, 1, stride=stride, bias=False,
                                   norm=get_norm(norm, out_channels))
        s1x1, s3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_channels, bottleneck_channels, 1, stride=s1x1, bias=False,
                            norm=get_norm(norm, bottleneck_channels), activation=nn.ReLU(inplace=True))
        self.conv2 = Conv2d(bottleneck_channels, bottleneck_channels, 3, stride=s3x3, padding=1, bias=False,
                            norm=get_norm(norm, bottleneck_channels), activation=nn.ReLU(inplace=True))
        self.conv3 = Conv2d(bottleneck_channels, out_channels, 1, bias=False, norm=get_norm(norm, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        # (not one `and`: TorchScript prunes only a whole `if not torch.jit.is_scripting()` block, uncompiled)
        if not torch.jit.is_scripting():  # noqa: SIM102 - the eager-only fused path
            if self.use_shortcut and self.conv3.fused_inference and self.conv3.can_fuse(x):
                # CPU inference after folding: conv3 + bias + shortcut + ReLU as one kernel (see Conv2d)
                sc = self.shortcut(x) if self.shortcut is not None else x
                return self.conv3.forward_fused(self.conv2(self.conv1(x)), add=sc, relu=True)
        # conv3's output is a fresh tensor (conv, norm): adding the shortcut and the ReLU in place saves
        # two passes over memory per block (measurable on CPUs), and autograd needs neither input.
        out = self.conv3(self.conv2(self.conv1(x)))
        if self.use_shortcut:
            out += self.shortcut(x) if self.shortcut is not None else x
        return out.relu_()


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block (v2): BN and ReLU before each convolution, identity path untouched."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm: NormSpec = "BN",
                 shortcut: bool = True) -> None:
        super().__init__()
        self.use_shortcut = shortcut
        self.shortcut: nn.Module | None = None
        if shortcut and (stride != 1 or in_channels != out_channels):
            self.shortcut = Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        self.norm1 = get_norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = get_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = _relu(self.norm1(x))
        out = self.conv2(_relu(self.norm2(self.conv1(pre))))
        if self.use_shortcut:
            # The projection sees the pre-activated input, as in the paper's Fig. 4 and timm.
            out = out + (self.shortcut(pre) if self.shortcut is not None else x)
        return out


class PreActBottleneckBlock(nn.Module):
    """Pre-activation bottleneck (v2, "Identity Mappings in Deep Residual Networks"), stride on the 3x3."""

    def __init__(self, in_channels: int, out_channels: int, *, bottleneck_channels: int, stride: int = 1,
                 norm: NormSpec = "BN", shortcut: bool = True, stride_in_1x1: bool = False) -> None:
        super().__init__()
        self.use_shortcut = shortcut
        self.shortcut: nn.Module | None = None
        if shortcut and (stride != 1 or in_channels != out_channels):
            self.shortcut = Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        s1x1, s3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.norm1 = get_norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, 1, stride=s1x1, bias=False)
        self.norm2 = get_norm(norm, bottleneck_channels)
        self.conv2 = nn.Conv2d(bottleneck_channels, bottleneck_channels, 3, stride=s3x3, padding=1, bias=False)
        self.norm3 = get_norm(norm, bottleneck_channels)
        self.conv3 = nn.Conv2d(bottleneck_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = _relu(self.norm1(x))
        out = self.conv1(pre)
        out = self.conv2(_relu(self.norm2(out)))
        out = self.conv3(_relu(self.norm3(out)))
        if self.use_shortcut:
            out = out + (self.shortcut(pre) if self.shortcut is not None else x)
        return out


class _Stem(nn.Module):
    """7x7/2 convolution and 3x3/2 max pooling (stride 4). Pre-activation nets keep no norm here."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormSpec, preact: bool) -> None:
        super().__init__()
        if preact:
            self.conv = Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)
        else:
            self.conv = Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False,
                               norm=get_norm(norm, out_channels), activation=nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(x))


def _check_freeze_at(freeze_at: int, n_stages: int, names: Sequence[str]) -> None:
    if isinstance(freeze_at, bool) or not isinstance(freeze_at, int) or not 0 <= freeze_at <= n_stages:
        raise ValueError(
            f"freeze_at={freeze_at!r} is out of range: use 0 (nothing frozen) up to {n_stages} "
            f"(frozen: {', '.join(names[:n_stages])}); 1 freezes the stem, k freezes stem..{names[1]}"
            f"..{names[n_stages - 1]}"
        )


class _StagedBackbone(Backbone):
    """Shared logic of the ResNet families: stem + named stages, selection and freezing."""

    if TYPE_CHECKING:  # not runtime class annotations: TorchScript has no `tuple[str, ...]`
        stage_names: tuple[str, ...]
        grad_checkpointing: tuple[str, ...]
        """Stages run under activation checkpointing in training (:meth:`set_grad_checkpointing`); set in
        the subclasses' ``__init__``."""

    @resolved_annotations
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Args: x: `(N, 3, H, W)` images. Returns: the selected maps, high to low resolution."""
        x = check_image_batch(x, self._type_name)
        outputs: dict[str, Tensor] = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        # named_children, not getattr(self, name): TorchScript takes only literal getattr names (children are
        # in registration order: stem, res2, ...)
        for name, stage in self.named_children():
            if name in self.stage_names:
                if not torch.jit.is_scripting() and self._checkpointed(name):
                    x = self._checkpoint(name, x)
                else:
                    x = stage(x)
                if name in self._out_features:
                    outputs[name] = x
        return outputs

    @torch.jit.unused
    @resolved_annotations  # TorchScript reads an unused method's signature: no string annotations
    def _checkpointed(self, name: str) -> bool:
        return name in self.grad_checkpointing and self.training and torch.is_grad_enabled()

    @torch.jit.unused
    @resolved_annotations
    def _checkpoint(self, name: str, x: Tensor) -> Tensor:
        # Activation checkpointing: keep only the stage's input, recompute its inside in backward.
        return torch.utils.checkpoint.checkpoint(getattr(self, name), x, use_reentrant=False)

    def split_last_stage(self) -> tuple[_StagedBackbone, nn.Module]:
        """Hand the last stage over to a per-RoI head: the ResNet paper's C4 detector runs res5 on each
        pooled RoI instead of on the whole image.

        Returns `(trunk, stage)`: `trunk` is this backbone, now ending at the stage before (its only
        output, e.g. `res4` at stride 16), and `stage` the detached `nn.Sequential` (e.g. `res5`).
        Parameters are neither copied nor re-initialised, and state-dict keys keep their names
        (`res2..res4.*` here, `res5.*` under whatever module takes the stage), so build the full trunk,
        load its weights, then split.

        Example::

            >>> trunk = ResNet(50, out_features=("res4", "res5"))
            >>> trunk, res5 = trunk.split_last_stage()
            >>> trunk.output_shape()
            {'res4': ShapeSpec(channels=1024, stride=16)}

        Raises:
            ValueError: the backbone has no stage left to split off.
        """
        if not self.stage_names:
            raise ValueError(f"{type(self).__name__} has no stage to split off (it ends at the stem)")
        name = self.stage_names[-1]
        stage = getattr(self, name)
        delattr(self, name)
        self.stage_names = self.stage_names[:-1]
        self._out_features = (self.stage_names[-1] if self.stage_names else "stem",)
        return self, stage

    def freeze(self, freeze_at: int) -> None:
        """Freeze the stem (1) and stages res2..res_k (k): no gradients, BN turned into frozen BN."""
        modules = [("stem", self.stem)] + [(n, getattr(self, n)) for n in self.stage_names]
        _check_freeze_at(freeze_at, len(modules), [m[0] for m in modules])
        for name, module in modules[:freeze_at]:
            for p in module.parameters():
                p.requires_grad_(False)
            frozen = FrozenBatchNorm2d.convert(module)
            if frozen is not module:
                setattr(self, name, frozen)
        self.freeze_at = freeze_at

    def set_grad_checkpointing(self, enable: bool | Sequence[str] = True) -> None:
        """Activation (gradient) checkpointing of the stages, as timm's ``set_grad_checkpointing``.

        A checkpointed stage keeps only its input during the forward pass and recomputes its activations in
        the backward pass (``torch.utils.checkpoint``, non-reentrant): less memory, one more forward of the
        stage per step, the same gradients. Only in training with gradients enabled; inference is unchanged.
        BatchNorm in training mode updates its running statistics again during the recomputation (frozen BN,
        the detection default, has none).

        Args:
            enable: True (every stage), False (none), or stage names, e.g. ``("res2", "res3")``.

        Raises:
            ValueError: A name that is not one of this backbone's stages.
        """
        if isinstance(enable, bool):
            self.grad_checkpointing = tuple(self.stage_names) if enable else ()
            return
        names = tuple(enable)
        unknown = [n for n in names if n not in self.stage_names]
        if unknown or isinstance(enable, str):
            raise ValueError(f"grad checkpointing: {list(unknown) if unknown else enable!r} is not a list of stages of "
                             f"this {type(self).__name__} (stages: {', '.join(self.stage_names)}); give True, False "
                             "or some of them")
        self.grad_checkpointing = names


class ResNet(_StagedBackbone):
    """ResNet v1/v2 (and plain twins) with multi-stage outputs.

    Args:
        depth: 18, 34, 50, 101 or 152.
        out_features: subset of ("stem", "res2", "res3", "res4", "res5"). Stages after the last one
            requested are not built (a C4 detector builds res5 as its RoI head).
        norm: "BN", "SyncBN", "FrozenBN", "GN", or a callable `channels -> nn.Module`.
        freeze_at: 0 = nothing frozen, 1 = stem, k = stem..res_k.
        preact: pre-activation blocks (ResNet v2).
        shortcut: False gives the plain twin of the paper (same layers, no shortcut connections).
        stride_in_1x1: original-paper placement of the stride in bottleneck blocks.
        width: channels of the stem and of res2's bottleneck (64 in the paper; small values make
            cheap test models of full depth).
        in_channels: input channels.
        zero_init_residual: zero the last norm of each residual branch (v1 only), "Bag of Tricks".

    Example::

        >>> net = ResNet(50, out_features=("res3", "res5"))
        >>> {k: tuple(v.shape) for k, v in net(torch.zeros(1, 3, 224, 224)).items()}
        {'res3': (1, 512, 28, 28), 'res5': (1, 2048, 7, 7)}
    """

    def __init__(self, depth: int = 50, *, out_features: Sequence[str] | None = None, norm: NormSpec = "BN",
                 freeze_at: int = 0, preact: bool = False, shortcut: bool = True, stride_in_1x1: bool = False,
                 width: int = 64, in_channels: int = 3, zero_init_residual: bool = False) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"depth={depth!r} is not a ResNet depth; choose one of {sorted(RESNET_DEPTHS)}")
        if width < 1 or in_channels < 1:
            raise ValueError(f"width and in_channels must be positive, got width={width}, in_channels={in_channels}")
        check_norm(norm)
        self.depth, self.preact, self.has_shortcut = depth, preact, shortcut
        block_kind, blocks = RESNET_DEPTHS[depth]
        available = ("stem", *STAGE_NAMES)
        self._out_features = self._select_out_features(out_features, available, STAGE_NAMES)
        last = available.index(self._out_features[-1])

        self.stem = _Stem(in_channels, width, norm, preact)
        shapes = {"stem": ShapeSpec(width, 4)}
        in_ch, stride = width, 4
        names = []
        for i, (name, n_blocks) in enumerate(zip(STAGE_NAMES[: max(last, 0)], blocks)):
            first_stride = 1 if i == 0 else 2
            stride *= first_stride
            layers: list[nn.Module] = []
            if block_kind == "basic":
                out_ch = width * 2**i
                cls = PreActBasicBlock if preact else BasicBlock
                for b in range(n_blocks):
                    layers.append(cls(in_ch, out_ch, stride=first_stride if b == 0 else 1, norm=norm,
                                      shortcut=shortcut))
                    in_ch = out_ch
            else:
                mid, out_ch = width * 2**i, width * 2**i * 4
                cls = PreActBottleneckBlock if preact else BottleneckBlock
                for b in range(n_blocks):
                    layers.append(cls(in_ch, out_ch, bottleneck_channels=mid, stride=first_stride if b == 0 else 1,
                                      norm=norm, shortcut=shortcut, stride_in_1x1=stride_in_1x1))
                    in_ch = out_ch
            self.add_module(name, nn.Sequential(*layers))
            shapes[name] = ShapeSpec(out_ch, stride)
            names.append(name)
        self.stage_names = tuple(names)
        self.grad_checkpointing = ()
        self._out_feature_shapes = shapes
        self.reset_parameters(zero_init_residual)
        self.freeze(freeze_at)

    def reset_parameters(self, zero_init_residual: bool = False) -> None:
        c2_msra_fill(self)
        if zero_init_residual and not self.preact:
            for m in self.modules():
                if isinstance(m, BottleneckBlock):
                    last = m.conv3.norm
                elif isinstance(m, BasicBlock):
                    last = m.conv2.norm
                else:
                    continue
                if getattr(last, "weight", None) is not None:
                    nn.init.zeros_(last.weight)


class CifarResNet(_StagedBackbone):
    """CIFAR-style ResNet / plain net with 6n+2 layers (He et al. 2015, section 4.2).

    A 3x3 stem conv with 16 channels, three stages of n basic blocks with 16/32/64 channels at strides
    1/2/4, named `res2`, `res3`, `res4`.

    Args:
        depth: 20, 32, 44, 56 or 110 (any 6n+2 works).
        shortcut: False gives the plain net.
        shortcut_type: "A" (zero-padded identity, the paper's CIFAR choice) or "B" (projection).
        width: channels of the first stage (16 in the paper).
    """

    def __init__(self, depth: int = 20, *, out_features: Sequence[str] | None = None, norm: NormSpec = "BN",
                 freeze_at: int = 0, shortcut: bool = True, shortcut_type: str = "A", width: int = 16,
                 in_channels: int = 3) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth!r} is not of the form 6n+2 (n >= 1); the paper uses {CIFAR_DEPTHS}")
        if shortcut_type not in ("A", "B"):
            raise ValueError(f"shortcut_type={shortcut_type!r}; use 'A' (zero-padded identity) or 'B' (projection)")
        check_norm(norm)
        n = (depth - 2) // 6
        names = STAGE_NAMES[:3]
        self._out_features = self._select_out_features(out_features, ("stem", *names), names)
        self.depth, self.preact, self.has_shortcut = depth, False, shortcut
        self.stem = Conv2d(in_channels, width, 3, padding=1, bias=False, norm=get_norm(norm, width),
                           activation=nn.ReLU(inplace=True))
        shapes = {"stem": ShapeSpec(width, 1)}
        in_ch, stride = width, 1
        for i, name in enumerate(names):
            out_ch, s = width * 2**i, (1 if i == 0 else 2)
            stride *= s
            blocks = [BasicBlock(in_ch if b == 0 else out_ch, out_ch, stride=s if b == 0 else 1, norm=norm,
                                 shortcut=shortcut, shortcut_type=shortcut_type) for b in range(n)]
            self.add_module(name, nn.Sequential(*blocks))
            shapes[name] = ShapeSpec(out_ch, stride)
            in_ch = out_ch
        self.stage_names = names
        self.grad_checkpointing = ()
        self._out_feature_shapes = shapes
        c2_msra_fill(self)
        self.freeze(freeze_at)


def count_trainable(module: nn.Module) -> int:
    """Number of parameters with `requires_grad=True`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
    "CIFAR_DEPTHS",
    "RESNET_DEPTHS",
    "BasicBlock",
    "BottleneckBlock",
    "CifarResNet",
    "PreActBasicBlock",
    "PreActBottleneckBlock",
    "ResNet",
    "count_trainable",
]

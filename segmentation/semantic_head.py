"""Semantic FPN head of Panoptic FPN (Kirillov et al. 2019): its targets, loss and inference.

Resizing choice: the label maps follow the model's resize. Each image's `sem_seg` (int64 `[H, W]` at the
image's original size) is resized with nearest-neighbour to the size the preprocessor gave the image,
and padded with the ignore value to the padded batch; the loss is taken on the head's logits upsampled
4x to the padded batch (Detectron2's `SemSegFPNHead`). Nearest keeps labels as labels (no blended
classes) and the loss then sees the pixels the network saw. At inference the logits are cropped to each
image's resized size and resized bilinearly to the original size before the argmax, so `sem_seg` comes
out at the size of the input image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from backbone.layers import Conv2d, NormSpec, c2_msra_fill, get_norm

__all__ = ["SemanticFPNHead", "check_semantic_targets", "prepare_semantic_targets", "semantic_inference",
           "semantic_loss"]


class SemanticFPNHead(nn.Module):
    """Panoptic FPN's semantic branch.

    From each input level (P2..P5): stages of 3x3 conv + norm + ReLU + 2x bilinear upsampling until
    stride `common_stride` (P2: one conv, no upsampling; P5: three stages), the levels summed, a 1x1
    conv to classes, and a `common_stride`x bilinear upsampling to the input resolution.

    Args:
        in_features: feature names, e.g. `("p2", "p3", "p4", "p5")`.
        in_strides: their strides (powers of two, >= `common_stride`).
        in_channels: channels of those features (the FPN width).
        num_classes: semantic classes, background included (labels `0..num_classes-1`).
        conv_dims: channels of the stages (128 in the paper).
        common_stride: stride at which the levels are summed (4).
        norm: norm of the stages ("GN" in the paper).
        loss_weight: multiplies `loss_sem_seg` (0.5 in Panoptic FPN).
        ignore_index: the label of pixels the loss ignores (255).

    It is a `detection.faster_rcnn.ImageHead` (`check_targets`, `losses`, `predict`), so the R-CNN forward
    runs it beside the RoI heads (`PanopticFPN`); `SemanticFPN` runs it alone.
    """

    def __init__(self, in_features: Sequence[str], in_strides: Sequence[int], in_channels: int, num_classes: int,
                 *, conv_dims: int = 128, common_stride: int = 4, norm: NormSpec = "GN", loss_weight: float = 1.0,
                 ignore_index: int = 255) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index
        if len(in_features) != len(in_strides) or not in_features:
            raise ValueError(f"give one stride per feature: in_features={tuple(in_features)}, "
                             f"in_strides={tuple(in_strides)}")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must count the background too (>= 2)")
        for f, s in zip(in_features, in_strides):
            if s < common_stride or s & (s - 1):
                raise ValueError(f"feature {f!r} has stride {s}; the semantic head needs power-of-two strides "
                                 f">= common_stride={common_stride}")
        self.in_features = tuple(in_features)
        self.common_stride = common_stride
        self.num_classes = num_classes
        use_bias = norm in (None, "none", "")
        heads = []
        for stride in in_strides:
            layers: list[nn.Module] = []
            for k in range(max(1, int(math.log2(stride) - math.log2(common_stride)))):
                conv = Conv2d(in_channels if k == 0 else conv_dims, conv_dims, 3, padding=1, bias=use_bias,
                              norm=get_norm(norm, conv_dims), activation=nn.ReLU(inplace=True))
                c2_msra_fill(conv)
                layers.append(conv)
                if stride != common_stride:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            heads.append(nn.Sequential(*layers))
        self.scale_heads = nn.ModuleList(heads)
        self.predictor = nn.Conv2d(conv_dims, num_classes, 1)
        c2_msra_fill(self.predictor)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Features `(B, C, H/s, W/s)` per level -> logits `(B, num_classes, H, W)` at the batch resolution
        (`H = common_stride * H/common_stride`)."""
        x = None
        for f, head in zip(self.in_features, self.scale_heads):
            y = head(features[f])
            x = y if x is None else x + y
        x = self.predictor(x)
        return F.interpolate(x, scale_factor=self.common_stride, mode="bilinear", align_corners=False)

    def check_targets(self, targets: Sequence[dict[str, Tensor]], original_sizes: Sequence[tuple[int, int]]) -> None:
        """`check_semantic_targets` with this head's classes and ignore value."""
        check_semantic_targets(targets, original_sizes, self.num_classes, self.ignore_index)

    def losses(self, logits: Tensor, targets: Sequence[dict[str, Tensor]], sizes: Sequence[tuple[int, int]],
               original_sizes: Sequence[tuple[int, int]], batch_size: tuple[int, int]) -> dict[str, Tensor]:
        """`{"loss_sem_seg": ...}` of the padded-batch logits against the label maps (`prepare_semantic_targets`),
        times `loss_weight`."""
        sem = prepare_semantic_targets(targets, sizes, original_sizes, batch_size, self.ignore_index, logits.device)
        return {"loss_sem_seg": semantic_loss(logits, sem, self.ignore_index) * self.loss_weight}

    def predict(self, logits: Tensor, sizes: Sequence[tuple[int, int]], original_sizes: Sequence[tuple[int, int]]
                ) -> list[dict[str, Tensor]]:
        """`[{"sem_seg": int64 [H, W]}, ...]` at each image's size (`semantic_inference`)."""
        return [{"sem_seg": s} for s in semantic_inference(logits, sizes, original_sizes)]


def check_semantic_targets(targets: Sequence[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]],
                           num_classes: int, ignore_index: int) -> None:
    """Raise `ValueError` naming the image unless every target has an integer `sem_seg` `[H, W]` at its
    image's size with labels in `0..num_classes-1` or `ignore_index` (one host sync for the values)."""
    if targets is None or not isinstance(targets, list | tuple) or len(targets) != len(image_sizes):
        n = len(targets) if isinstance(targets, list | tuple) else type(targets).__name__
        raise ValueError(f"targets must be a list with one dict per image holding 'sem_seg' (int64 [H, W]): got {n} "
                         f"for {len(image_sizes)} images")
    flags = []
    for i, (t, (h, w)) in enumerate(zip(targets, image_sizes)):
        if not isinstance(t, dict) or "sem_seg" not in t:
            keys = sorted(t) if isinstance(t, dict) else type(t).__name__
            raise ValueError(f"targets[{i}] has no 'sem_seg' (keys: {keys}); semantic segmentation trains on an "
                             "int64 [H, W] label map per image (build the dataset with with_semantic=True)")
        sem = t["sem_seg"]
        if not isinstance(sem, Tensor) or sem.dim() != 2 or tuple(sem.shape) != (h, w):
            shape = tuple(sem.shape) if isinstance(sem, Tensor) else type(sem).__name__
            raise ValueError(f"targets[{i}]['sem_seg'] has shape {shape}, expected [{h}, {w}] (one label per pixel "
                             "of the image)")
        if sem.is_floating_point() or sem.is_complex() or sem.dtype == torch.bool:
            raise ValueError(f"targets[{i}]['sem_seg'] has dtype {sem.dtype}; pass integer labels (int64)")
        flags.append((((sem < 0) | (sem >= num_classes)) & (sem != ignore_index)).any())
    bad = torch.stack(flags).cpu().tolist()
    for i, b in enumerate(bad):
        if b:
            sem = targets[i]["sem_seg"]
            values = torch.unique(sem[((sem < 0) | (sem >= num_classes)) & (sem != ignore_index)])[:5].tolist()
            raise ValueError(f"targets[{i}]['sem_seg'] has labels {values} outside 0..{num_classes - 1} that are not "
                             f"the ignore value {ignore_index}; check the label mapping and num_classes")


def prepare_semantic_targets(targets: Sequence[dict[str, Tensor]], sizes: Sequence[tuple[int, int]],
                             original_sizes: Sequence[tuple[int, int]], batch_size: tuple[int, int],
                             ignore_index: int, device: torch.device) -> Tensor:
    """Label maps that follow the model's resize: nearest resize to each image's resized size, padded
    with `ignore_index` to the padded batch.

    Returns:
        int64 `(B, H_batch, W_batch)`.
    """
    out = torch.full((len(targets), *batch_size), ignore_index, dtype=torch.int64, device=device)
    for i, (t, s, o) in enumerate(zip(targets, sizes, original_sizes)):
        sem = t["sem_seg"].to(device=device)
        if tuple(s) != tuple(o):
            # Labels up to 255 are exact in float32; nearest never blends two classes.
            sem = F.interpolate(sem[None, None].float(), size=tuple(s), mode="nearest")[0, 0]
        out[i, : s[0], : s[1]] = sem.to(torch.int64)
    return out


def semantic_loss(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """Pixel-mean cross-entropy in fp32 over non-ignored pixels (0, with a gradient, when all are ignored).

    Args:
        logits: `(B, C, H, W)`.
        targets: int64 `(B, H, W)`.
    """
    total = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    # Sum / count rather than reduction="mean", which is 0/0 = NaN for a batch without any labelled pixel.
    return total / (targets != ignore_index).sum().clamp(min=1)


def semantic_inference(logits: Tensor, sizes: Sequence[tuple[int, int]],
                       original_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Per image: crop the padded-batch logits `(B, C, H, W)` to its resized size, resize bilinearly to its
    original size and take the argmax: int64 `[H_i, W_i]` label maps."""
    out = []
    for i, (s, o) in enumerate(zip(sizes, original_sizes)):
        x = logits[i:i + 1, :, : s[0], : s[1]].float()
        if tuple(s) != tuple(o):
            x = F.interpolate(x, size=tuple(o), mode="bilinear", align_corners=False)
        out.append(x[0].argmax(0))
    return out

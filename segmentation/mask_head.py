"""Mask R-CNN's mask branch: the conv + deconv head, mask targets, the mask loss, and pasting the 28x28
masks back into each image, batched over RoIs (no Python loop over RoIs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from backbone.layers import Conv2d, NormSpec, get_norm
from detection.boxes import at_least_fp32
from detection.poolers import RoIPooler
from detection.roi_heads import RoIHeads
from detection.structures import GroundTruth

__all__ = ["MaskRCNNHead", "MaskRoIHeads", "crop_mask_targets", "mask_loss", "paste_masks_in_image"]


class MaskRCNNHead(nn.Module):
    """`num_convs` 3x3 convs (+ norm) + ReLU, a 2x2 stride-2 transposed conv + ReLU, and a 1x1 conv
    to one mask per class (He et al. 2017, FPN variant).

    Module names match `detection.convert` (torchvision's `mask_head.*` -> `convs.{i}.*`,
    `conv5_mask` -> `deconv`, `mask_fcn_logits` -> `predictor`).

    Args:
        in_channels: channels of the pooled features (the FPN width).
        num_classes: classes including the background (torchvision keeps a background channel).
        num_convs / conv_dim: the conv tower (4 x 256 in the paper).
        norm: norm of the tower's convs ("none" in the paper, "BN" in torchvision's v2, "GN").
    """

    def __init__(self, in_channels: int, num_classes: int, *, num_convs: int = 4, conv_dim: int = 256,
                 norm: NormSpec = "none") -> None:
        super().__init__()
        use_bias = norm in (None, "none", "")
        convs = []
        c = in_channels
        for _ in range(num_convs):
            conv = Conv2d(c, conv_dim, 3, padding=1, bias=use_bias, norm=get_norm(norm, conv_dim),
                          activation=nn.ReLU(inplace=True))
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            convs.append(conv)
            c = conv_dim
        self.convs = nn.Sequential(*convs)
        self.deconv = nn.ConvTranspose2d(c, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.deconv.bias)
        # Detectron's init: small logits at the start, so the first BCE steps are not dominated by noise.
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        """`(K, C, R, R)` pooled features -> `(K, num_classes, 2R, 2R)` mask logits."""
        return self.predictor(F.relu(self.deconv(self.convs(x))))


# ------------------------------------------------------------------------------------------ targets
def crop_mask_targets(masks: Sequence[Tensor], boxes: Tensor, image_index: Tensor, mask_index: Tensor,
                      resolution: int) -> Tensor:
    """Crop and resize ground-truth masks to the RoIs with RoIAlign: the mask targets.

    Bin `(i, j)` of the `resolution x resolution` grid holds the mask's bilinear value at the centre of
    that bin of the box, in continuous pixel coordinates (pixel `k` covers `[k, k+1)`): `aligned=True`
    and one sample per pixel-sized step (`sampling_ratio=0`, adaptive), Detectron2's rule. A box whose
    side equals the resolution therefore copies the pixels exactly.

    Args:
        masks: one `(K_i, H_i, W_i)` tensor per image (any dtype, non-zero = inside), at the size the
            boxes refer to (the image's original size).
        boxes: `(P, 4)` xyxy in those pixels.
        image_index: `(P,)` image of each box.
        mask_index: `(P,)` index of each box's mask within its image's `masks`.
        resolution: side of the targets.

    Returns:
        `(P, resolution, resolution)` float32 in `[0, 1]`, on `boxes.device`.
    """
    p = boxes.shape[0]
    out = torch.zeros((p, resolution, resolution), dtype=torch.float32, device=boxes.device)
    if p == 0:
        return out
    # Images have different sizes, so their masks cannot share one RoIAlign input without padding every
    # mask to the largest image (T x Hmax x Wmax floats, and zeros instead of RoIAlign's border rule at the
    # padded edges): one call per image with a RoI, after one host read of the per-image counts.
    counts = torch.bincount(image_index, minlength=len(masks)).tolist()
    order = torch.argsort(image_index, stable=True)
    start = 0
    for i, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        m = masks[i].to(device=boxes.device, dtype=torch.float32)
        rois = torch.cat([mask_index[sel].to(torch.float32)[:, None], boxes[sel].float()], dim=1)
        out[sel] = roi_align(m[:, None], rois, resolution, 1.0, sampling_ratio=0, aligned=True)[:, 0]
    return out


def mask_loss(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of each RoI's own-class mask, in fp32 (float64 for float64 logits).

    Args:
        logits: `(P, num_classes, M, M)` (any float dtype).
        labels: `(P,)` class of each RoI (selects the channel).
        targets: `(P, M, M)` in `[0, 1]`.
    """
    m = logits.shape[-1]
    own = at_least_fp32(logits.gather(1, labels.view(-1, 1, 1, 1).expand(-1, 1, m, m)).squeeze(1))
    return F.binary_cross_entropy_with_logits(own, targets.to(own.dtype))


# ------------------------------------------------------------------------------------------- paste
def _interpolation_matrix(start: Tensor, end: Tensor, size: int, samples: int) -> Tensor:
    """`(D, size, samples)` bilinear weights along one axis: row `y` holds the weights with which
    `F.interpolate(mode="bilinear", align_corners=False)` of a `samples`-long mask stretched over pixels
    `start..end` (inclusive, integers) reads it at pixel `y`; rows outside that span are zero.

    The separable form of torchvision's `paste_mask_in_image` (resize the mask to the integer box, copy it
    into the image): the same source index, clamping and weights, so thresholded masks agree.
    """
    length = (end - start + 1).clamp(min=1)
    pos = torch.arange(size, device=start.device)[None, :] - start[:, None]  # (D, size) offset inside the box
    inside = (pos >= 0) & (pos < length[:, None])
    # float32 like PyTorch's upsample kernel: scale = in / out, src = scale * (dst + 0.5) - 0.5, clamped at 0.
    scale = torch.tensor(float(samples), device=start.device) / length.to(torch.float32)
    src = (scale[:, None] * (pos.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().clamp(max=samples - 1)
    lam = (src - i0).clamp(0, 1)
    i0 = i0.to(torch.int64)
    i1 = (i0 + 1).clamp(max=samples - 1)
    keep = inside.to(torch.float32)
    weights = torch.zeros((start.shape[0], size, samples), dtype=torch.float32, device=start.device)
    weights.scatter_add_(2, i0[..., None], ((1 - lam) * keep)[..., None])
    weights.scatter_add_(2, i1[..., None], (lam * keep)[..., None])
    return weights


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1) -> Tensor:
    """Paste `M x M` mask probabilities into an image at their boxes, all RoIs at once.

    torchvision's rule (so converted torchvision models give the same masks): pad each mask by
    `padding` zeros, grow its box by the same factor `(M + 2 padding) / M`, truncate the box to integers,
    resize the padded mask bilinearly (`align_corners=False`) to the box's pixels `x0..x1, y0..y1`
    (inclusive) and copy the part inside the image. Bilinear resizing is separable, so each mask is
    `Wy @ mask @ Wx^T` with per-RoI interpolation matrices: one batched matmul instead of one resize per
    RoI. Runs in fp32 (autocast is switched off: bf16 would move the 0.5 threshold), in float64 for float64
    masks; differentiable with respect to `masks`.

    Args:
        masks: `(D, M, M)` or `(D, 1, M, M)` probabilities.
        boxes: `(D, 4)` xyxy in the image's pixels.
        image_size: `(H, W)` of the image.
        padding: zeros added around each mask before resizing (1 in torchvision).

    Returns:
        `(D, 1, H, W)` float32 (float64 for float64 masks) probabilities (0 outside each box).
    """
    h, w = image_size
    d = masks.shape[0]
    if d == 0:
        return masks.new_zeros((0, 1, h, w), dtype=at_least_fp32(masks).dtype)
    if boxes.shape != (d, 4):
        raise ValueError(f"paste_masks_in_image: boxes has shape {tuple(boxes.shape)}, expected ({d}, 4) for "
                         f"{d} masks")
    m = masks.shape[-1]
    with torch.autocast(masks.device.type, enabled=False):
        padded = F.pad(at_least_fp32(masks.reshape(d, m, m)), (padding,) * 4)
        samples = m + 2 * padding
        boxes = at_least_fp32(boxes)
        half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * (float(samples) / m)
        centre = (boxes[:, 2:] + boxes[:, :2]) * 0.5
        grown = torch.cat([centre - half, centre + half], dim=1).to(torch.int64)  # truncation, as torchvision
        wy = _interpolation_matrix(grown[:, 1], grown[:, 3], h, samples)
        wx = _interpolation_matrix(grown[:, 0], grown[:, 2], w, samples)
        wy, wx = wy.to(padded.dtype), wx.to(padded.dtype)  # no-op in fp32; a float64 model keeps float64
        return torch.bmm(torch.bmm(wy, padded), wx.transpose(1, 2))[:, None]


# ---------------------------------------------------------------------------------------- RoI heads
class MaskRoIHeads(RoIHeads):
    """Box branch of Faster R-CNN plus the mask branch of Mask R-CNN.

    Training adds `loss_mask` (BCE of the positive sampled RoIs' own-class masks against
    `crop_mask_targets` of their matched ground truth, cropped at each image's original size). Eval
    adds `masks` `(D, 1, M, M)` probabilities of each detection's predicted class to each image's
    detections (boxes still in the resized image; `MaskRCNN.postprocess` pastes them).

    Args:
        in_features / pooler / box_head / num_classes / **kwargs: the box branch, as in `RoIHeads`.
        mask_pooler: RoIAlign of the mask head (14x14 from the same levels as the box pooler).
        mask_head: a `MaskRCNNHead` predicting `num_classes` masks (background included).
    """

    def __init__(self, in_features: Sequence[str], pooler: RoIPooler, box_head: nn.Module, num_classes: int, *,
                 mask_pooler: RoIPooler, mask_head: MaskRCNNHead, **kwargs: Any) -> None:
        super().__init__(in_features, pooler, box_head, num_classes, **kwargs)
        if mask_head.num_classes != num_classes:
            raise ValueError(f"mask_head predicts {mask_head.num_classes} classes but the box head {num_classes}; "
                             f"both count the background: build MaskRCNNHead(..., num_classes={num_classes})")
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head

    def check_targets(self, targets: Sequence[dict[str, Tensor]]) -> None:
        """Raise `ValueError` naming the image unless every training target holds `masks`."""
        for i, t in enumerate(targets):
            if isinstance(t, dict) and "masks" not in t:
                raise ValueError(f"targets[{i}] has no 'masks' (keys: {sorted(t)}); Mask R-CNN trains on instance "
                                 "masks: uint8 [K, H, W], one per box, at the image's size (build the dataset with "
                                 "with_masks=True)")

    def mask_logits(self, features: dict[str, Tensor], boxes: Tensor, image_index: Tensor) -> Tensor:
        """`(K, 4)` boxes of images `image_index` -> `(K, num_classes, M, M)` logits."""
        pooled = self.mask_pooler([features[f] for f in self.in_features], boxes, image_index)
        return self.mask_head(pooled)

    def mask_losses(self, features: dict[str, Tensor], sampled: dict[str, Tensor], gt: GroundTruth) -> Tensor:
        """`loss_mask` of the positive sampled RoIs (see the class docstring).

        Without any positive RoI in the batch the head still runs, on one RoI, and its loss is multiplied
        by zero: every parameter gets a (zero) gradient, as DDP without `find_unused_parameters` needs.
        """
        s = sampled["fg"].shape[1]
        positive = sampled["fg"].flatten().nonzero().squeeze(1)  # data-dependent size: one host sync
        has_positive = positive.numel() > 0
        if not has_positive:
            positive = torch.zeros(1, dtype=torch.int64, device=positive.device)
        boxes = sampled["boxes"].reshape(-1, 4)[positive]
        image_index = positive // s
        labels = sampled["labels"].flatten()[positive]
        logits = self.mask_logits(features, boxes, image_index)
        if not has_positive:
            return at_least_fp32(logits).sum() * 0.0
        if gt.masks is None:
            raise ValueError("MaskRoIHeads needs ground-truth masks in training: give every target 'masks' "
                             "(uint8 [K, H, W], one per box, at the image's size)")
        # Boxes live in the resized images; the masks at the original size: map the boxes back.
        if gt.image_sizes is not None and gt.original_sizes is not None:
            ratio = torch.tensor([[o[1] / r[1], o[0] / r[0]] for r, o in zip(gt.image_sizes, gt.original_sizes)],
                                 dtype=torch.float32, device=boxes.device)
            boxes = boxes * ratio[image_index].repeat(1, 2)
        counts = torch.as_tensor(gt.counts, device=boxes.device)
        starts = torch.cumsum(counts, 0) - counts
        matched = sampled["matched"].flatten()[positive]
        targets = crop_mask_targets(gt.masks, boxes, image_index, matched - starts[image_index],
                                    logits.shape[-1])
        return mask_loss(logits, labels, targets)

    def predict_masks(self, features: dict[str, Tensor], detections: list[dict[str, Tensor]]) -> None:
        """Add `masks` `(D_i, 1, M, M)` float32 (float64 in a float64 model) probabilities of each detection's
        class to each image's detections, all images in one head call; differentiable with gradients enabled,
        as torchvision's."""
        counts = [len(d["boxes"]) for d in detections]
        m = 2 * self.mask_pooler.output_size
        boxes = torch.cat([d["boxes"] for d in detections])
        if boxes.shape[0] == 0:
            for d in detections:
                d["masks"] = boxes.new_zeros((0, 1, m, m), dtype=at_least_fp32(boxes).dtype)
            return
        image_index = torch.repeat_interleave(torch.arange(len(detections), device=boxes.device),
                                              torch.as_tensor(counts, device=boxes.device))
        logits = self.mask_logits(features, boxes, image_index)
        labels = torch.cat([d["labels"] for d in detections])
        probs = at_least_fp32(logits.gather(1, labels.view(-1, 1, 1, 1).expand(-1, 1, *logits.shape[-2:]))).sigmoid()
        for d, p in zip(detections, probs.split(counts)):
            d["masks"] = p

    def forward(self, features: dict[str, Tensor], proposals: Tensor, valid: Tensor, image_sizes: Tensor,
                gt: GroundTruth | None = None) -> tuple[list[dict[str, Tensor]] | None, dict[str, Tensor]]:
        if self.training:
            if gt is None:
                raise ValueError("MaskRoIHeads needs ground truth in training mode")
            sampled = self.sample(proposals, valid, gt)
            logits, deltas = self.predictor(self.box_features(features, sampled["boxes"]))
            losses = self.losses(logits, deltas, sampled["boxes"].reshape(-1, 4), sampled, gt)
            losses["loss_mask"] = self.mask_losses(features, sampled, gt)
            return None, losses
        detections, losses = super().forward(features, proposals, valid, image_sizes)
        assert detections is not None
        self.predict_masks(features, detections)
        return detections, losses

"""Box coding and small box utilities. Boxes are `(..., 4)` xyxy in absolute pixels.

Decoding and encoding run in fp32 at least (also under autocast): `exp` of an fp16 delta overflows
long before a box is absurd. A float64 model stays in float64 (`at_least_fp32`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Largest log-scale a delta may apply: a box may grow at most 1000/16 times (detectron2/torchvision).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def at_least_fp32(x: Tensor) -> Tensor:
    """`x` in fp32, or unchanged when it is float64: half-precision values are widened for box arithmetic and
    losses, while a `model.double()` keeps its precision end to end (torchvision's detectors run in float64)."""
    return x if x.dtype == torch.float64 else x.float()


class BoxCoder:
    """Encode boxes as (dx, dy, dw, dh) deltas relative to reference boxes and decode them back.

    Args:
        weights: divisors of the four deltas: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for Fast R-CNN.
        clip: largest `dw`/`dh` before `exp`.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), clip: float = BBOX_XFORM_CLIP) -> None:
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must have 4 values (wx, wy, ww, wh), got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip

    def encode(self, reference: Tensor, targets: Tensor) -> Tensor:
        """Deltas that take `reference` (..., 4) to `targets` (..., 4); fp32 (float64 if either input is)."""
        dtype = torch.promote_types(at_least_fp32(reference).dtype, at_least_fp32(targets).dtype)
        reference, targets = reference.to(dtype), targets.to(dtype)
        wx, wy, ww, wh = self.weights
        ew = reference[..., 2] - reference[..., 0]
        eh = reference[..., 3] - reference[..., 1]
        ex = reference[..., 0] + 0.5 * ew
        ey = reference[..., 1] + 0.5 * eh
        gw = targets[..., 2] - targets[..., 0]
        gh = targets[..., 3] - targets[..., 1]
        gx = targets[..., 0] + 0.5 * gw
        gy = targets[..., 1] + 0.5 * gh
        return torch.stack(
            (wx * (gx - ex) / ew, wy * (gy - ey) / eh, ww * torch.log(gw / ew), wh * torch.log(gh / eh)), dim=-1
        )

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Apply deltas `(..., 4*K)` to reference boxes `(..., 4)`; returns `(..., K, 4)` flattened to
        `(..., 4*K)` like the input, in fp32 (float64 if either input is).

        Written with the same operation order as torchvision so converted models give the same boxes.
        """
        dtype = torch.promote_types(at_least_fp32(deltas).dtype, at_least_fp32(reference).dtype)
        deltas, reference = deltas.to(dtype), reference.to(dtype)
        wx, wy, ww, wh = self.weights
        widths = reference[..., 2] - reference[..., 0]
        heights = reference[..., 3] - reference[..., 1]
        ctr_x = reference[..., 0] + 0.5 * widths
        ctr_y = reference[..., 1] + 0.5 * heights
        dx = deltas[..., 0::4] / wx
        dy = deltas[..., 1::4] / wy
        dw = (deltas[..., 2::4] / ww).clamp(max=self.clip)
        dh = (deltas[..., 3::4] / wh).clamp(max=self.clip)
        pred_ctr_x = dx * widths[..., None] + ctr_x[..., None]
        pred_ctr_y = dy * heights[..., None] + ctr_y[..., None]
        pred_w = torch.exp(dw) * widths[..., None]
        pred_h = torch.exp(dh) * heights[..., None]
        half_w = 0.5 * pred_w
        half_h = 0.5 * pred_h
        boxes = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h),
                            dim=-1)
        return boxes.flatten(-2)


def clip_boxes(boxes: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
    """Clip `(B, N, 4)` boxes to each image's `(height, width)`, given as `(B,)` tensors."""
    h = heights.to(boxes.dtype).view(-1, *([1] * (boxes.dim() - 2)))
    w = widths.to(boxes.dtype).view(-1, *([1] * (boxes.dim() - 2)))
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    x1 = torch.minimum(torch.maximum(boxes[..., 0], zero), w)
    y1 = torch.minimum(torch.maximum(boxes[..., 1], zero), h)
    x2 = torch.minimum(torch.maximum(boxes[..., 2], zero), w)
    y2 = torch.minimum(torch.maximum(boxes[..., 3], zero), h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def nonempty(boxes: Tensor, min_size: float) -> Tensor:
    """Mask of boxes whose width and height are both >= min_size."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of `(N, 4)` and `(M, 4)` boxes -> `(N, M)`, in fp32 (float64 if either input is)."""
    dtype = torch.promote_types(at_least_fp32(a).dtype, at_least_fp32(b).dtype)
    a, b = a.to(dtype), b.to(dtype)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def batched_nms_exact(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float,
                      images: Tensor | None = None, num_images: int = 1, split: str | None = None) -> Tensor:
    """NMS within each group (e.g. image x level, or image x class): boxes of different groups never
    suppress each other. Returns kept indices sorted by decreasing score.

    NMS kernels are quadratic in the number of boxes they are given, so the work is split:
    - on a CPU, one call per group;
    - on a GPU, one call per image (`images` gives each box's image), the groups inside an image
      separated by offsetting their boxes far apart (torchvision's coordinate trick) in float64, so
      the offsets do not eat into the boxes' precision and the result equals per-group NMS.
    `split` ("group" or "image") overrides the choice (tests run the GPU strategy on a CPU).
    """
    from torchvision.ops import nms

    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    split = split or ("group" if boxes.device.type == "cpu" else "image")
    if split == "group":
        chunks = [(groups == g).nonzero().squeeze(1) for g in torch.unique(groups).tolist()]
        keep = [idx[nms(boxes[idx].float(), scores[idx].float(), iou_threshold)] for idx in chunks]
    else:
        if images is not None:
            # One host read for all images' box counts (instead of a nonzero per image).
            order = images.argsort(stable=True)
            chunks = list(order.split(torch.bincount(images, minlength=num_images).tolist()))
        else:
            chunks = [torch.arange(boxes.shape[0], device=boxes.device)]
        keep = []
        for idx in chunks:
            if idx.numel() == 0:
                continue
            b = boxes[idx].double()
            offsets = groups[idx].to(b.dtype) * (b.max() + 1)
            keep.append(idx[nms(b + offsets[:, None], scores[idx].double(), iou_threshold)])
    if not keep:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    keep_t = torch.cat(keep)
    return keep_t[scores[keep_t].argsort(descending=True, stable=True)]

"""Matching predictions to ground truth and sampling balanced minibatches, batched over images.

Ground truth for a batch is one flat `(T, 4)` tensor with an image index per box, so images with
different numbers of boxes need no Python loop and no padding to the largest image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .boxes import pairwise_iou

BACKGROUND, IGNORE = 0, -1


class Matcher:
    """Assign each prediction (anchor or proposal) to its best ground-truth box.

    Labels: 1 foreground (IoU >= high), 0 background (IoU < low), -1 ignored (in between). With
    `allow_low_quality_matches`, the predictions that have the highest IoU with some ground-truth box
    (if > 0) are foreground too, as in Faster R-CNN's RPN.
    """

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool = False) -> None:
        if not 0 <= low <= high <= 1:
            raise ValueError(f"Matcher thresholds must satisfy 0 <= low <= high <= 1, got low={low}, high={high}")
        self.high, self.low, self.allow_low_quality = high, low, allow_low_quality_matches

    def _labels(self, vals: Tensor, lq: Tensor | None) -> Tensor:
        labels = torch.full_like(vals, IGNORE, dtype=torch.int8)
        labels[vals < self.low] = BACKGROUND
        labels[vals >= self.high] = 1
        if lq is not None:
            labels[lq] = 1
        return labels

    def match_shared(self, gt_boxes: Tensor, gt_image: Tensor, preds: Tensor, num_images: int) -> tuple[Tensor, Tensor]:
        """Match the same `(A, 4)` predictions (anchors) against every image's ground truth.

        Args:
            gt_boxes: `(T, 4)` all ground-truth boxes of the batch.
            gt_image: `(T,)` image index of each box.
            preds: `(A, 4)` predictions shared by all images.
            num_images: B.

        Returns:
            `matched (B, A)` index into the T boxes (0 where unmatched) and `labels (B, A)` int8.
        """
        a = preds.shape[0]
        if gt_boxes.shape[0] == 0:
            zeros = torch.zeros(num_images, a, dtype=torch.int64, device=preds.device)
            return zeros, zeros.to(torch.int8)
        iou = pairwise_iou(gt_boxes, preds)  # (T, A)
        index = gt_image.view(-1, 1).expand_as(iou)
        best = torch.zeros(num_images, a, device=iou.device).scatter_reduce_(0, index, iou, "amax")
        # Which box reached the image's best IoU: the largest such index (ties are measure-zero events).
        t_ids = torch.arange(iou.shape[0], device=iou.device, dtype=torch.int64).view(-1, 1).expand_as(iou)
        hit = torch.where(iou == best.gather(0, index), t_ids, -1)
        matched = torch.full((num_images, a), -1, dtype=torch.int64, device=iou.device).scatter_reduce_(
            0, index, hit, "amax")
        lq = None
        if self.allow_low_quality:
            highest = iou.max(dim=1, keepdim=True).values
            is_lq = ((iou == highest) & (highest > 0)).to(torch.uint8)
            lq = torch.zeros(num_images, a, dtype=torch.uint8, device=iou.device).scatter_reduce_(
                0, index, is_lq, "amax").bool()
        labels = self._labels(best, lq)
        labels[matched < 0] = BACKGROUND
        return matched.clamp(min=0), labels

    def match_per_image(self, gt_boxes: Tensor, gt_image: Tensor, preds: Tensor, pred_image: Tensor
                        ) -> tuple[Tensor, Tensor]:
        """Match `(N, 4)` predictions that each belong to one image (`pred_image`) to that image's boxes.

        Returns `matched (N,)` index into the T boxes and `labels (N,)` int8.
        """
        n = preds.shape[0]
        if gt_boxes.shape[0] == 0:
            zeros = torch.zeros(n, dtype=torch.int64, device=preds.device)
            return zeros, zeros.to(torch.int8)
        iou = pairwise_iou(gt_boxes, preds)  # (T, N)
        iou = torch.where(gt_image.view(-1, 1) == pred_image.view(1, -1), iou, torch.full_like(iou, -1.0))
        vals, matched = iou.max(dim=0)
        lq = None
        if self.allow_low_quality:
            highest = iou.max(dim=1, keepdim=True).values
            lq = ((iou == highest) & (highest > 0)).any(dim=0)
        labels = self._labels(vals, lq)
        labels[vals < 0] = BACKGROUND  # an image without boxes
        return matched, labels


def sample_balanced(labels: Tensor, batch_size: int, positive_fraction: float, *,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Pick up to `batch_size` entries per row: positives (label 1) up to the fraction, negatives (0)
    for the rest, at random. Fixed output size, no host synchronisation.

    Args:
        labels: `(B, N)` with 1 / 0 / -1 (positive / negative / ignore).

    Returns:
        `index (B, S)` into N with `S = min(batch_size, N)`, and `valid (B, S)`: False where a row had
        too few candidates to fill its S slots.
    """
    b, n = labels.shape
    s = min(batch_size, n)
    max_pos = min(int(batch_size * positive_fraction), n)
    pos, neg = labels == 1, labels == 0
    num_pos = torch.clamp(pos.sum(dim=1), max=max_pos)
    num_neg = torch.clamp(neg.sum(dim=1), max=batch_size - num_pos)
    r = torch.rand(b, n, device=labels.device, generator=generator)
    # A random top-k among the positives (negatives) of each row: every candidate of the kind outranks
    # every other entry (keys >= 0 vs -1), so the first num_pos (num_neg) picks are of the right kind.
    pos_top = torch.where(pos, r, -1.0).topk(max_pos, dim=1).indices
    neg_top = torch.where(neg, r, -1.0).topk(min(s, n), dim=1).indices
    slots = torch.cat([pos_top, neg_top], dim=1)
    take = torch.cat([torch.arange(max_pos, device=labels.device)[None] < num_pos[:, None],
                      torch.arange(neg_top.shape[1], device=labels.device)[None] < num_neg[:, None]], dim=1)
    # Compact to S slots, chosen entries first: a small top-k over the candidate slots.
    order = (take.float() * 2 + torch.rand(take.shape, device=labels.device, generator=generator)).topk(s, dim=1)
    return slots.gather(1, order.indices), take.gather(1, order.indices)

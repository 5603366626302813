"""Region Proposal Network (Ren et al. 2015), batched over images and levels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from backbone.layers import Conv2d

from .anchors import AnchorGenerator
from .boxes import BoxCoder, at_least_fp32, batched_nms_exact, clip_boxes, nonempty
from .matcher import Matcher, sample_balanced
from .structures import GroundTruth


class RPNHead(nn.Module):
    """Shared 3x3 conv(s) + ReLU, then 1x1 objectness (A per location) and 1x1 deltas (4A).

    Args:
        in_channels: channels of every input level (they must all be equal).
        num_anchors: anchors per location.
        conv_depth: number of 3x3 convs (1 in the paper, 2 in torchvision's v2 models).
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(*[Conv2d(in_channels, in_channels, 3, padding=1, activation=nn.ReLU(inplace=True))
                                    for _ in range(conv_depth)])
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in [*self.conv, self.objectness, self.deltas]:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Returns objectness `(N, sum HWA)` and deltas `(N, sum HWA, 4)`, flattened level by level in
        (H, W, A) order to line up with the anchors."""
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            o, d = self.objectness(t), self.deltas(t)
            n, a, h, w = o.shape
            logits.append(o.permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(d.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)


class RPN(nn.Module):
    """Proposals and RPN losses.

    Args:
        in_features: names of the feature maps to run on (e.g. p2..p6, or res4 for C4).
        head: the `RPNHead`.
        anchor_generator: anchors matching `in_features`.
        pre_nms_topk / post_nms_topk: `(train, test)` top-k before NMS (per level) and after (per image).
        nms_thresh: IoU threshold of the proposal NMS.
        fg_iou / bg_iou: anchor labelling thresholds.
        batch_size_per_image / positive_fraction: anchor sampling for the loss.
        box_loss: "smooth_l1" (beta 1/9, as in torchvision/Detectron) or "l1".
        min_box_size: proposals smaller than this (pixels) are dropped.
    """

    def __init__(self, in_features: Sequence[str], head: RPNHead, anchor_generator: AnchorGenerator, *,
                 pre_nms_topk: tuple[int, int] = (2000, 1000), post_nms_topk: tuple[int, int] = (2000, 1000),
                 nms_thresh: float = 0.7, fg_iou: float = 0.7, bg_iou: float = 0.3, batch_size_per_image: int = 256,
                 positive_fraction: float = 0.5, box_loss: str = "smooth_l1", smooth_l1_beta: float = 1.0 / 9,
                 min_box_size: float = 1e-3, score_thresh: float = 0.0) -> None:
        super().__init__()
        if box_loss not in ("smooth_l1", "l1"):
            raise ValueError(f"box_loss={box_loss!r}; use 'smooth_l1' or 'l1'")
        self.in_features = tuple(in_features)
        self.head = head
        self.anchor_generator = anchor_generator
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou, bg_iou, allow_low_quality_matches=True)
        self.pre_nms_topk, self.post_nms_topk = pre_nms_topk, post_nms_topk
        self.nms_thresh, self.min_box_size, self.score_thresh = nms_thresh, min_box_size, score_thresh
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta
        self.last_nonfinite: Tensor | None = None

    def forward(self, features: dict[str, Tensor], image_sizes: Tensor, gt: GroundTruth | None = None,
                padded_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Args:
            features: the backbone's maps.
            image_sizes: `(B, 2)` (height, width) of each image inside the padded batch.
            gt: ground truth (training only).
            padded_size: `(H, W)` of the padded batch (only torchvision-style anchor strides need it).

        Returns:
            proposals `(B, P, 4)`, a `(B, P)` validity mask (images may have fewer than P proposals after
            NMS) and the loss dict (empty in eval mode).
        """
        feats = [features[f] for f in self.in_features]
        logits, deltas = self.head(feats)
        logits, deltas = at_least_fp32(logits), at_least_fp32(deltas)
        grid_sizes = [tuple(f.shape[-2:]) for f in feats]
        anchors_per_level = self.anchor_generator(grid_sizes, feats[0].device, image_size=padded_size)
        anchors = torch.cat(anchors_per_level)
        level_sizes = [a.shape[0] for a in anchors_per_level]
        with torch.no_grad():
            proposals, valid = self._proposals(anchors, logits.detach(), deltas.detach(), level_sizes, image_sizes)
        losses: dict[str, Tensor] = {}
        if self.training:
            if gt is None:
                raise ValueError("the RPN needs ground truth in training mode")
            losses = self._losses(anchors, logits, deltas, gt)
        return proposals, valid, losses

    def _proposals(self, anchors: Tensor, logits: Tensor, deltas: Tensor, level_sizes: list[int],
                   image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        b = logits.shape[0]
        pre = self.pre_nms_topk[0 if self.training else 1]
        post = self.post_nms_topk[0 if self.training else 1]
        # Top-k per level and image: fixed shapes, one batched op per level.
        scores, idxs, levels = [], [], []
        start = 0
        for lvl, n in enumerate(level_sizes):
            k = min(pre, n)
            s, i = logits[:, start:start + n].topk(k, dim=1)
            scores.append(s)
            idxs.append(i + start)
            levels.append(torch.full((k,), lvl, dtype=torch.int64, device=logits.device))
            start += n
        scores_t, idx = torch.cat(scores, dim=1), torch.cat(idxs, dim=1)  # (B, K)
        level = torch.cat(levels)[None].expand(b, -1)
        sel_deltas = deltas.gather(1, idx[..., None].expand(-1, -1, 4))
        boxes = self.box_coder.decode(sel_deltas, anchors[idx])  # (B, K, 4)
        # Non-finite candidates (a diverged model, NaN weights) are dropped, counted per image, and their boxes
        # zeroed: even an invalid proposal is pooled (fixed shapes), and torchvision's CPU roi_align crashes the
        # process (SIGSEGV) on one NaN or +inf coordinate. Device ops only: no host synchronisation here.
        finite = torch.isfinite(boxes).all(-1) & torch.isfinite(scores_t)
        if not torch.compiler.is_compiling():  # a traced / exported graph keeps no Python-side state
            self.last_nonfinite = (~finite).sum(1)  # (B,) candidates dropped as non-finite in the last forward
        boxes = torch.where(finite[..., None], boxes, torch.zeros_like(boxes))
        boxes = clip_boxes(boxes, image_sizes[:, 0], image_sizes[:, 1])
        probs = torch.sigmoid(scores_t)
        keep = finite & nonempty(boxes, self.min_box_size) & (probs >= self.score_thresh)
        if not self.training:
            # At inference an image with any non-finite candidate gets no proposals at all (hence no detections):
            # its features are not trustworthy; `FasterRCNN.nonfinite_images` names it to the caller.
            keep = keep & finite.all(1, keepdim=True)
        # NMS per (image, level): data-dependent output, so this is where the RPN must synchronise.
        groups = torch.arange(b, device=boxes.device)[:, None] * len(level_sizes) + level
        flat_keep = keep.flatten().nonzero().squeeze(1)
        image_of = torch.arange(b, device=boxes.device).repeat_interleave(boxes.shape[1])[flat_keep]
        kept = flat_keep[batched_nms_exact(boxes.flatten(0, 1)[flat_keep], probs.flatten()[flat_keep],
                                           groups.flatten()[flat_keep], self.nms_thresh, image_of, b)]
        # Back to a fixed (B, post) layout: the best `post` survivors of each image, by score.
        survived = torch.zeros(b * boxes.shape[1], dtype=torch.bool, device=boxes.device)
        survived[kept] = True
        key = torch.where(survived.view(b, -1), probs, torch.full_like(probs, -1.0))
        k = min(post, key.shape[1])
        top_key, top = key.topk(k, dim=1)
        if not self.training:
            # Valid proposals come first (sorted by score): drop the columns no image fills, so the box head does
            # not run on padding when fewer than `post` proposals survive (small images). One host read; the
            # NMS above has synchronised already. Training keeps the fixed width (the sampler's random draws).
            k = max(1, int((top_key >= 0).sum(1).max()))
            top_key, top = top_key[:, :k], top[:, :k]
        return boxes.gather(1, top[..., None].expand(-1, -1, 4)), top_key >= 0

    def _losses(self, anchors: Tensor, logits: Tensor, deltas: Tensor, gt: GroundTruth) -> dict[str, Tensor]:
        b = logits.shape[0]
        matched, labels = self.matcher.match_shared(gt.boxes, gt.image_index, anchors, b)
        index, valid = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        sampled_labels = labels.gather(1, index)
        pos = valid & (sampled_labels == 1)
        num = valid.sum().clamp(min=1)
        obj = F.binary_cross_entropy_with_logits(logits.gather(1, index), pos.to(logits.dtype), reduction="none")
        loss_obj = (obj * valid).sum() / num
        target_boxes = gt.boxes[matched.gather(1, index)] if gt.boxes.numel() else anchors[index]
        targets = self.box_coder.encode(anchors[index], target_boxes)
        pred = deltas.gather(1, index[..., None].expand(-1, -1, 4))
        box = _box_loss(pred, targets, self.box_loss, self.smooth_l1_beta)
        loss_box = (box.sum(-1) * pos).sum() / num
        return {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_box}


def _box_loss(pred: Tensor, target: Tensor, kind: str, beta: float) -> Tensor:
    # Non-positive entries may hold inf/NaN targets (degenerate pairs); zero them before the loss so
    # that multiplying by the mask cannot turn them into NaN.
    target = torch.nan_to_num(target, nan=0.0, posinf=0.0, neginf=0.0)
    if kind == "l1":
        return (pred - target).abs()
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="none")

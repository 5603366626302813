"""Fast R-CNN RoI heads: sampling, box heads (2fc, 4conv1fc, res5 for C4, VGG fc6/fc7), losses and
post-processing, all batched over images with fixed-size tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from backbone.layers import Conv2d, NormSpec, get_norm

from .boxes import BoxCoder, at_least_fp32, batched_nms_exact, clip_boxes, nonempty
from .matcher import IGNORE, Matcher, sample_balanced
from .poolers import RoIPooler
from .rpn import _box_loss
from .structures import GroundTruth


class TwoMLPHead(nn.Module):
    """Two fully connected layers with ReLU (the FPN paper's box head): `(K, C, R, R)` -> `(K, fc_dim)`."""

    def __init__(self, in_channels: int, resolution: int, fc_dim: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels * resolution * resolution, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.out_channels = fc_dim
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class ConvFCHead(nn.Module):
    """`num_convs` 3x3 convs (+ norm) and one fc: the "4conv1fc" head of torchvision's v2 models."""

    def __init__(self, in_channels: int, resolution: int, *, num_convs: int = 4, conv_dim: int = 256,
                 fc_dim: int = 1024, norm: NormSpec = "BN") -> None:
        super().__init__()
        use_bias = norm in (None, "none", "")
        convs = []
        c = in_channels
        for _ in range(num_convs):
            conv = Conv2d(c, conv_dim, 3, padding=1, bias=use_bias, norm=get_norm(norm, conv_dim),
                          activation=nn.ReLU(inplace=True))
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            convs.append(conv)
            c = conv_dim
        self.convs = nn.Sequential(*convs)
        self.fc = nn.Linear(c * resolution * resolution, fc_dim)
        nn.init.kaiming_uniform_(self.fc.weight, a=1)
        nn.init.zeros_(self.fc.bias)
        self.out_channels = fc_dim

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.convs(x).flatten(1)))


class Res5Head(nn.Module):
    """The C4 design of the ResNet paper: res5 runs per RoI, then global average pooling."""

    def __init__(self, res5: nn.Module, out_channels: int, head_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.res5 = res5
        self.head_norm = head_norm
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.res5(x)
        if self.head_norm is not None:  # pre-activation nets end with BN + ReLU
            x = F.relu(self.head_norm(x))
        return x.mean(dim=(2, 3))


class FastRCNNPredictor(nn.Module):
    """Class scores (num_classes, background included) and class-specific box deltas."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Box branch of Faster R-CNN.

    Args:
        in_features: feature maps the pooler reads (p2..p5, or res4 / conv5 for C4).
        pooler: the `RoIPooler`.
        box_head: maps pooled `(K, C, R, R)` to `(K, D)` and has `out_channels = D`.
        num_classes: number of classes including background (index 0).
        fg_iou / bg_iou: a proposal is foreground at IoU >= fg_iou, background below bg_iou.
        batch_size_per_image / positive_fraction: RoIs sampled per image for the loss.
        bbox_reg_weights: BoxCoder weights, (10, 10, 5, 5).
        score_thresh / nms_thresh / detections_per_img: inference post-processing.
        box_loss: "smooth_l1" (beta 1/9, torchvision) or "l1".
        predictor: class scores and box deltas from the box head's `(K, D)` features; default a new
            `FastRCNNPredictor(box_head.out_channels, num_classes)`. Builders pass one to fix the order in
            which heads are initialised (seeded runs stay reproducible when a head is added after it).
    """

    def __init__(self, in_features: Sequence[str], pooler: RoIPooler, box_head: nn.Module, num_classes: int, *,
                 fg_iou: float = 0.5, bg_iou: float = 0.5, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 box_loss: str = "smooth_l1", smooth_l1_beta: float = 1.0 / 9, min_box_size: float = 1e-2,
                 predictor: FastRCNNPredictor | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must count the background too (>= 2)")
        if predictor is not None and predictor.cls_score.out_features != num_classes:
            raise ValueError(f"the predictor scores {predictor.cls_score.out_features} classes but num_classes="
                             f"{num_classes}; build it with FastRCNNPredictor(box_head.out_channels, {num_classes})")
        self.in_features = tuple(in_features)
        self.box_pooler = pooler
        self.box_head = box_head
        self.predictor = predictor if predictor is not None else FastRCNNPredictor(box_head.out_channels, num_classes)
        self.num_classes = num_classes
        self.matcher = Matcher(fg_iou, bg_iou, allow_low_quality_matches=False)
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.box_loss, self.smooth_l1_beta, self.min_box_size = box_loss, smooth_l1_beta, min_box_size
        self.last_nonfinite: Tensor | None = None  # (B,) bool: images emptied as non-finite by the last postprocess

    # ------------------------------------------------------------------------------------ training
    def sample(self, proposals: Tensor, valid: Tensor, gt: GroundTruth) -> dict[str, Tensor]:
        """Add the ground truth to the proposals, match, and sample a fixed number of RoIs per image.

        Returns `boxes (B, S, 4)`, `valid (B, S)`, `labels (B, S)` (0 = background), `matched (B, S)`
        (index into gt) and `fg (B, S)`.
        """
        b, _p = valid.shape
        if gt.boxes.numel():
            gmax = max(gt.counts)
            counts = torch.as_tensor(gt.counts, device=gt.boxes.device)
            # Position of each box within its image: gt is ordered by image, so subtract each image's start.
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(gt.boxes.shape[0], device=gt.boxes.device) - starts[gt.image_index]
            gt_pad = proposals.new_zeros((b, gmax, 4))
            gt_valid = torch.zeros((b, gmax), dtype=torch.bool, device=valid.device)
            gt_pad[gt.image_index, slot] = gt.boxes.to(proposals.dtype)
            gt_valid[gt.image_index, slot] = True
            proposals = torch.cat([proposals, gt_pad], dim=1)
            valid = torch.cat([valid, gt_valid], dim=1)
        n = proposals.shape[1]
        image_of = torch.arange(b, device=valid.device).repeat_interleave(n)
        matched, labels = self.matcher.match_per_image(gt.boxes, gt.image_index, proposals.reshape(-1, 4), image_of)
        matched, labels = matched.view(b, n), labels.view(b, n)
        labels = torch.where(valid, labels, torch.full_like(labels, IGNORE))
        index, sample_valid = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        fg = sample_valid & (labels.gather(1, index) == 1)
        matched = matched.gather(1, index)
        cls = gt.labels[matched] if gt.labels.numel() else torch.zeros_like(matched)
        cls = torch.where(fg, cls, torch.zeros_like(cls))
        return {"boxes": proposals.gather(1, index[..., None].expand(-1, -1, 4)), "valid": sample_valid,
                "labels": cls, "matched": matched, "fg": fg}

    def losses(self, logits: Tensor, deltas: Tensor, rois: Tensor, sampled: dict[str, Tensor], gt: GroundTruth
               ) -> dict[str, Tensor]:
        valid, fg, labels = sampled["valid"].flatten(), sampled["fg"].flatten(), sampled["labels"].flatten()
        num = valid.sum().clamp(min=1)
        ce = F.cross_entropy(at_least_fp32(logits), labels, reduction="none")
        loss_cls = (ce * valid).sum() / num
        target_boxes = gt.boxes[sampled["matched"].flatten()] if gt.boxes.numel() else rois
        targets = self.box_coder.encode(rois, target_boxes)
        pred = at_least_fp32(deltas).view(-1, self.num_classes, 4)
        pred = pred.gather(1, labels.view(-1, 1, 1).expand(-1, 1, 4)).squeeze(1)
        box = _box_loss(pred, targets, self.box_loss, self.smooth_l1_beta)
        loss_box = (box.sum(-1) * fg).sum() / num
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

    # ----------------------------------------------------------------------------------- common
    def box_features(self, features: dict[str, Tensor], boxes: Tensor) -> Tensor:
        """Pool and run the box head for `(B, S, 4)` boxes -> `(B*S, D)`."""
        b, s = boxes.shape[:2]
        batch_index = torch.arange(b, device=boxes.device).repeat_interleave(s)
        pooled = self.box_pooler([features[f] for f in self.in_features], boxes.reshape(-1, 4), batch_index)
        return self.box_head(pooled)

    def forward(self, features: dict[str, Tensor], proposals: Tensor, valid: Tensor, image_sizes: Tensor,
                gt: GroundTruth | None = None) -> tuple[list[dict[str, Tensor]] | None, dict[str, Tensor]]:
        if self.training:
            if gt is None:
                raise ValueError("RoIHeads needs ground truth in training mode")
            sampled = self.sample(proposals, valid, gt)
            logits, deltas = self.predictor(self.box_features(features, sampled["boxes"]))
            return None, self.losses(logits, deltas, sampled["boxes"].reshape(-1, 4), sampled, gt)
        logits, deltas = self.predictor(self.box_features(features, proposals))
        return self.postprocess(logits, deltas, proposals, valid, image_sizes), {}

    # ---------------------------------------------------------------------------------- inference
    def postprocess(self, logits: Tensor, deltas: Tensor, proposals: Tensor, valid: Tensor, image_sizes: Tensor
                    ) -> list[dict[str, Tensor]]:
        """Per-class boxes, score threshold, per-class NMS and top-k, batched over images.

        Returns one dict per image with `boxes (D, 4)`, `scores (D,)`, `labels (D,)` in the padded
        batch's (resized) coordinates. Like torchvision's, differentiable when called with gradients enabled
        (boxes and scores carry `grad_fn`); under `torch.no_grad()` / `inference_mode` nothing is recorded.
        """
        b, p = valid.shape
        c = self.num_classes
        scores = F.softmax(at_least_fp32(logits), dim=-1).view(b, p, c)
        boxes = self.box_coder.decode(deltas.view(b, p, -1), proposals).view(b, p, c, 4)
        boxes = clip_boxes(boxes.view(b, p * c, 4), image_sizes[:, 0], image_sizes[:, 1]).view(b, p, c, 4)
        # An image whose box head gave a non-finite score or box on a valid proposal (a diverged model) gets no
        # detections at all; `FasterRCNN.nonfinite_images` names it to the caller.
        finite = torch.isfinite(scores).all(-1) & torch.isfinite(boxes).flatten(2).all(-1)
        bad_image = (valid & ~finite).any(1)
        if not torch.compiler.is_compiling():
            self.last_nonfinite = bad_image
        boxes, scores = boxes[:, :, 1:], scores[:, :, 1:]  # drop the background class
        keep = (valid & ~bad_image[:, None])[:, :, None] & (scores > self.score_thresh) & nonempty(boxes,
                                                                                                self.min_box_size)
        flat = keep.flatten().nonzero().squeeze(1)  # data-dependent: the inference path synchronises here
        img = flat // (p * (c - 1))
        cls = flat % (c - 1)
        kept = flat[batched_nms_exact(boxes.reshape(-1, 4)[flat], scores.flatten()[flat], img * c + cls,
                                      self.nms_thresh, img, b)]
        survivors = torch.full((b * p * (c - 1),), -1.0, dtype=scores.dtype, device=scores.device)
        survivors[kept] = scores.flatten()[kept]
        k = min(self.detections_per_img, survivors.numel() // b)
        top_scores, top = survivors.view(b, -1).topk(k, dim=1)
        out_boxes = boxes.reshape(b, -1, 4).gather(1, top[..., None].expand(-1, -1, 4))
        out_labels = top % (c - 1) + 1
        results = []
        for i in range(b):
            m = top_scores[i] >= 0
            results.append({"boxes": out_boxes[i][m], "scores": top_scores[i][m], "labels": out_labels[i][m]})
        return results

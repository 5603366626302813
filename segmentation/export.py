"""Export Mask R-CNN (and Faster R-CNN) to ONNX or `torch.export`: `detection.export`'s graph plus the mask branch,
with the masks pasted into the input image in the graph.

    from segmentation.export import export_onnx
    export_onnx(model, "mask_rcnn.onnx")   # image uint8 (H, W, 3) -> boxes, scores, labels, masks (D, 1, H, W)

The functions take any detector `detection.export` takes; a model with a mask head gets the `masks` output
(float32 probabilities, threshold at 0.5 for binary masks), as the eager `MaskRCNN`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detection import export as _export
from detection.export import FORMATS, check_detector, load_program, pool_rois
from detection.faster_rcnn import FasterRCNN

from .mask_head import MaskRoIHeads, _interpolation_matrix

__all__ = ["FORMATS", "MaskBranchForExport", "export", "export_onnx", "export_program", "load_program",
           "paste_masks_traceable"]


def paste_masks_traceable(masks: Tensor, boxes: Tensor, image_size: tuple[Any, Any], padding: int = 1) -> Tensor:
    """`paste_masks_in_image` without its Python checks on the number of masks (a data-dependent size in an
    exported graph): the same arithmetic, `(D, M, M)` probabilities -> `(D, 1, H, W)` float32."""
    h, w = image_size
    d, m = masks.shape[0], masks.shape[-1]
    padded = F.pad(masks.reshape(d, m, m).float(), (padding,) * 4)
    samples = m + 2 * padding
    boxes = boxes.float()
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * (float(samples) / m)
    centre = (boxes[:, 2:] + boxes[:, :2]) * 0.5
    grown = torch.cat([centre - half, centre + half], dim=1).to(torch.int64)  # truncation, as torchvision
    wy = _interpolation_matrix(grown[:, 1], grown[:, 3], h, samples)
    wx = _interpolation_matrix(grown[:, 0], grown[:, 2], w, samples)
    return torch.bmm(torch.bmm(wy, padded), wx.transpose(1, 2))[:, None]


class MaskBranchForExport(nn.Module):
    """The eval mask branch of a `MaskRoIHeads` for one image, traceable: pool the detections' boxes (resized
    image), run the mask head, take each detection's class, sigmoid, paste at the input image's size.

    `forward(features, boxes_resized (D, 4), labels (D,), boxes (D, 4) in the input's pixels, (H, W))`
    -> `(D, 1, H, W)` float32 probabilities.
    """

    def __init__(self, roi_heads: MaskRoIHeads) -> None:
        super().__init__()
        self.mask_pooler, self.mask_head = roi_heads.mask_pooler, roi_heads.mask_head
        self.in_features = tuple(roi_heads.in_features)

    def forward(self, features: dict[str, Tensor], boxes_resized: Tensor, labels: Tensor, boxes: Tensor,
                image_size: tuple[Any, Any]) -> Tensor:
        pooled = pool_rois(self.mask_pooler, [features[f] for f in self.in_features], boxes_resized)
        logits = self.mask_head(pooled)
        m = logits.shape[-1]
        probs = logits.gather(1, labels.view(-1, 1, 1, 1).expand(-1, 1, m, m)).float().sigmoid()
        return paste_masks_traceable(probs, boxes, image_size)


def _mask_branch(model: FasterRCNN) -> MaskBranchForExport | None:
    check_detector(model)
    if isinstance(model.roi_heads, MaskRoIHeads):
        return MaskBranchForExport(model.roi_heads)
    return None


def export_onnx(model: FasterRCNN, path: str | os.PathLike, **kwargs: Any) -> Path:
    """`detection.export.export_onnx` with the mask branch of a Mask R-CNN (outputs `boxes, scores, labels, masks`)."""
    return _export.export_onnx(model, path, mask_branch=_mask_branch(model), **kwargs)


def export_program(model: FasterRCNN, path: str | os.PathLike, **kwargs: Any) -> Path:
    """`detection.export.export_program` with the mask branch of a Mask R-CNN."""
    return _export.export_program(model, path, mask_branch=_mask_branch(model), **kwargs)


def export(model: FasterRCNN, path: str | os.PathLike, fmt: str = "onnx", **kwargs: Any) -> Path:
    """`export_onnx` or `export_program` by `fmt` ("onnx" or "torch-export"), Faster or Mask R-CNN."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    return export_onnx(model, path, **kwargs) if fmt == "onnx" else export_program(model, path, **kwargs)

"""Drawing detections, instance masks, semantic maps and ground truth, through torchvision's utilities.

Boxes and their labels are drawn by ``torchvision.utils.draw_bounding_boxes`` (which measures the
label text with PIL's font), masks by ``torchvision.utils.draw_segmentation_masks``. Every function
takes and returns a ``uint8 [3, H, W]`` RGB tensor (a ``uint8 [H, W, 3]`` NumPy array is accepted
as input), so the result can be saved with ``to_pil(img).save(...)`` or shown in a notebook.

Example::

    from detection.visualize import draw_instances, side_by_side, to_pil
    pred = draw_instances(image, model([image.float() / 255])[0], class_names=names, score_thresh=0.5)
    gt = draw_instances(image, target, class_names=names)          # no "scores": ground truth
    to_pil(side_by_side(gt, pred)).save("compare.jpg")
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["colour_for", "draw_instances", "side_by_side", "to_pil"]

IGNORE_LABEL = 255


def colour_for(label: int) -> tuple[int, int, int]:
    """A stable, well-spread RGB colour per class label (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((int(label) * 0.618034) % 1.0, 0.75, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def _as_chw_uint8(image: Tensor | np.ndarray) -> Tensor:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 [H, W, 3] RGB, got {image.dtype} {list(image.shape)}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a uint8 tensor [3, H, W] or array [H, W, 3], got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must be [3, H, W], got {list(image.shape)}")
    if image.dtype != torch.uint8:
        if not image.is_floating_point():
            raise ValueError(f"image tensor must be uint8 or float in [0, 1], got {image.dtype}")
        image = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.detach().cpu()


def _label_text(label: int, score: float | None, class_names: Sequence[str] | None) -> str:
    name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
    return name if score is None else f"{name} {score:.2f}"


def draw_instances(
    image: Tensor | np.ndarray,
    instances: Mapping[str, Any],
    *,
    class_names: Sequence[str] | None = None,
    score_thresh: float = 0.5,
    mask_alpha: float = 0.5,
    box_width: int = 2,
) -> Tensor:
    """Draws one image's detections or ground truth.

    Args:
        image: ``uint8 [3, H, W]`` (or float in ``[0, 1]``) tensor, or ``uint8 [H, W, 3]`` array.
        instances: A model output or a dataset target, at the image's size: ``boxes`` (``[K, 4]``
            xyxy pixels), ``labels`` (``[K]``), optional ``scores`` (``[K]``; without it the
            instances are ground truth and all are drawn), ``masks`` (``[K, H, W]`` or
            ``[K, 1, H, W]``, probabilities or 0/1, thresholded at 0.5) and ``sem_seg``
            (``[H, W]`` labels; 0 = background and 255 = ignore are not painted).
        class_names: Names indexed by label (``class_names[0]`` is the background).
        score_thresh: Detections with a lower score are not drawn.
        mask_alpha: Opacity of masks and semantic regions.
        box_width: Box outline width in pixels.

    Returns:
        The drawing, ``uint8 [3, H, W]``.
    """
    canvas = _as_chw_uint8(image)
    h, w = canvas.shape[-2:]
    scores = instances.get("scores")
    labels = torch.as_tensor(instances.get("labels", torch.zeros(0)), dtype=torch.int64).reshape(-1).cpu()
    keep = torch.ones(len(labels), dtype=torch.bool)
    if scores is not None:
        scores = torch.as_tensor(scores).reshape(-1).float().cpu()
        keep = scores >= score_thresh
    colours = [colour_for(int(lab)) for lab in labels[keep].tolist()]

    sem = instances.get("sem_seg")
    if sem is not None:
        sem = torch.as_tensor(sem).cpu()
        if tuple(sem.shape) != (h, w):
            raise ValueError(f"sem_seg is {list(sem.shape)} but the image is {h}x{w}")
        present = [int(v) for v in torch.unique(sem).tolist() if v not in (0, IGNORE_LABEL)]
        if present:
            regions = torch.stack([sem == v for v in present])
            canvas = draw_segmentation_masks(canvas, regions, alpha=mask_alpha,
                                             colors=[colour_for(v) for v in present])

    masks = instances.get("masks")
    if masks is not None and int(keep.sum()) > 0:
        masks = torch.as_tensor(masks).cpu()
        if masks.dim() == 4:
            masks = masks[:, 0]
        if tuple(masks.shape[-2:]) != (h, w):
            raise ValueError(f"masks are {list(masks.shape[-2:])} but the image is {h}x{w}")
        binary = (masks.float() > 0.5)[keep]
        canvas = draw_segmentation_masks(canvas, binary, alpha=mask_alpha, colors=colours)

    boxes = instances.get("boxes")
    if boxes is not None and int(keep.sum()) > 0:
        boxes = torch.as_tensor(boxes).reshape(-1, 4).float().cpu()[keep]
        kept_scores = scores[keep].tolist() if scores is not None else [None] * len(boxes)
        texts = [_label_text(int(lab), s, class_names) for lab, s in zip(labels[keep].tolist(), kept_scores)]
        canvas = draw_bounding_boxes(canvas, boxes, labels=texts, colors=colours, width=box_width)
    return canvas


def side_by_side(*images: Tensor, gap: int = 8, fill: int = 255) -> Tensor:
    """Places ``uint8 [3, H, W]`` images left to right (top-aligned), ``gap`` pixels apart."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    height = max(int(img.shape[-2]) for img in images)
    width = sum(int(img.shape[-1]) for img in images) + gap * (len(images) - 1)
    out = torch.full((3, height, width), fill, dtype=torch.uint8)
    x = 0
    for img in images:
        out[:, : img.shape[-2], x : x + img.shape[-1]] = img
        x += int(img.shape[-1]) + gap
    return out


def to_pil(image: Tensor) -> Image.Image:
    """``uint8 [3, H, W]`` tensor -> PIL image (for ``.save``)."""
    return Image.fromarray(_as_chw_uint8(image).permute(1, 2, 0).numpy())

"""Small containers passed between the detector's parts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GroundTruth:
    """All ground truth of a batch, flat: `boxes (T, 4)` xyxy in the padded batch's pixels,
    `labels (T,)` int64 (1..num_classes-1), `image_index (T,)`, `counts` (boxes per image, on the
    host, so no shape has to be read back from the device), and optionally `masks`: one
    `(K_i, H_i, W_i)` tensor per image (kept per image: sizes differ) at the image's ORIGINAL size.
    `image_sizes` / `original_sizes` ((h, w) per image, resized and as given) let a head map boxes
    back to the original pixels, e.g. to crop mask targets from `masks` without resizing them."""

    boxes: Tensor
    labels: Tensor
    image_index: Tensor
    num_images: int
    counts: list[int]
    masks: list[Tensor] | None = None
    image_sizes: list[tuple[int, int]] | None = None
    original_sizes: list[tuple[int, int]] | None = None

    @classmethod
    def from_targets(cls, targets: list[dict[str, Tensor]], device: torch.device, *,
                     image_sizes: list[tuple[int, int]] | None = None,
                     original_sizes: list[tuple[int, int]] | None = None) -> GroundTruth:
        boxes = [t["boxes"].to(device=device, dtype=torch.float32) for t in targets]
        labels = [t["labels"].to(device=device, dtype=torch.int64) for t in targets]
        index = torch.cat([torch.full((len(b),), i, dtype=torch.int64, device=device) for i, b in enumerate(boxes)])
        masks = [t["masks"] for t in targets] if all("masks" in t for t in targets) and targets else None
        return cls(torch.cat(boxes).view(-1, 4), torch.cat(labels), index, len(targets), [len(b) for b in boxes], masks,
                   image_sizes, original_sizes)

"""The one place where detector inputs are checked, resized, normalised and batched, and where
detections are mapped back to each input image's own coordinates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .specs import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessor", "check_images", "check_targets", "resize_scale"]


def resize_scale(h: int, w: int, min_size: float, max_size: float) -> float:
    """Scale that brings the shorter side to `min_size` unless the longer would exceed `max_size`.

    The output size is `floor(side * scale)` (torchvision's `GeneralizedRCNNTransform` rule, kept so
    converted torchvision models see the same pixels).
    """
    return min(min_size / min(h, w), max_size / max(h, w))


def check_images(images: Sequence[Tensor]) -> None:
    """Raise `ValueError` naming the offending image unless `images` is a non-empty list of
    float `[3, H, W]` tensors."""
    if isinstance(images, Tensor) or not isinstance(images, list | tuple):
        raise ValueError(f"images must be a list of [3, H, W] float tensors, got {type(images).__name__}; "
                         "for a batched (N, 3, H, W) tensor pass list(batch)")
    if len(images) == 0:
        raise ValueError("images is an empty list")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor):
            raise ValueError(f"images[{i}] is a {type(img).__name__}, expected a [3, H, W] float tensor")
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"images[{i}] has shape {tuple(img.shape)}, expected [3, H, W] (RGB, channels first)")
        if not img.is_floating_point():
            raise ValueError(f"images[{i}] has dtype {img.dtype}; expected float values in [0, 1] "
                             "(convert uint8 images with img.float() / 255)")
        if img.shape[1] < 1 or img.shape[2] < 1:
            raise ValueError(f"images[{i}] is empty: shape {tuple(img.shape)}")


def check_targets(targets: Sequence[dict[str, Tensor]] | None, num_images: int, num_classes: int,
                  image_sizes: Sequence[tuple[int, int]]) -> None:
    """Validate training targets; every problem raises `ValueError` naming the image and the field.

    One host synchronisation for the whole batch (all value checks are reduced into one flag first).
    """
    if targets is None:
        raise ValueError("targets must be given in training mode: a list with one dict per image holding "
                         "'boxes' (float [K, 4] xyxy pixels) and 'labels' (int64 [K])")
    if not isinstance(targets, list | tuple) or len(targets) != num_images:
        n = len(targets) if isinstance(targets, list | tuple) else type(targets).__name__
        raise ValueError(f"targets must be a list with one dict per image: got {n} for {num_images} images")
    checks = []
    for i, t in enumerate(targets):
        if not isinstance(t, dict):
            raise ValueError(f"targets[{i}] is a {type(t).__name__}, expected a dict with 'boxes' and 'labels'")
        # The boxes first, shape included, then the labels: a malformed box tensor is reported as such even when
        # the labels are missing too (torchvision checks the boxes alone).
        for key in ("boxes", "labels"):
            if key not in t:
                raise ValueError(f"targets[{i}] has no {key!r} (keys: {sorted(t)})")
            if not isinstance(t[key], Tensor):
                raise ValueError(f"targets[{i}][{key!r}] is a {type(t[key]).__name__}, expected a tensor")
            if key == "boxes" and (t[key].dim() != 2 or t[key].shape[1] != 4):
                raise ValueError(f"targets[{i}]['boxes'] has shape {tuple(t[key].shape)}, expected [K, 4] (xyxy); "
                                 "an image without objects has shape (0, 4)")
        boxes, labels = t["boxes"], t["labels"]
        if not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes'] has dtype {boxes.dtype}, expected a float dtype")
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"targets[{i}]['labels'] has shape {tuple(labels.shape)}, expected [{boxes.shape[0]}] "
                             "(one label per box)")
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"targets[{i}]['labels'] has dtype {labels.dtype}, expected int64")
        if "masks" in t:
            m = t["masks"]
            h, w = image_sizes[i]
            ok = isinstance(m, Tensor) and m.dim() == 3 and m.shape[0] == boxes.shape[0]
            if not ok or tuple(m.shape[1:]) != (h, w):
                shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"targets[{i}]['masks'] has shape {shape}, expected [{boxes.shape[0]}, {h}, {w}] "
                                 "(one binary mask per box, at the image's size)")
        if boxes.numel():
            bad_box = ~torch.isfinite(boxes).all(dim=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            bad_label = (labels < 1) | (labels >= num_classes)
            checks.append((i, bad_box, bad_label))
    if not checks:
        return
    flags = torch.stack([torch.stack([bb.any(), bl.any()]) for _, bb, bl in checks])
    if not bool(flags.any()):  # the single synchronisation
        return
    for (i, bad_box, bad_label), (fb, fl) in zip(checks, flags.tolist()):
        if fb:
            k = int(bad_box.nonzero()[0])
            raise ValueError(f"targets[{i}]['boxes'][{k}] = {targets[i]['boxes'][k].tolist()} is degenerate or not "
                             "finite: boxes are xyxy with x2 > x1 and y2 > y1 (drop or fix zero-size boxes)")
        if fl:
            k = int(bad_label.nonzero()[0])
            raise ValueError(f"targets[{i}]['labels'][{k}] = {int(targets[i]['labels'][k])} is out of range: "
                             f"labels are 1..{num_classes - 1} (0 is the background)")


class Preprocessor(nn.Module):
    """Resize (optional), normalise and pad a list of images into one batch tensor.

    Args:
        min_size: training shorter side; a tuple picks one at random per image (multi-scale). None or
            0 disables resizing (the data loader already resized).
        max_size: training cap on the longer side.
        test_min_size / test_max_size: the same at inference.
        pixel_mean / pixel_std: normalisation of `[0, 1]` RGB inputs.
        size_divisibility: the batch is padded to a multiple of this (the backbone's).
        channels_last: return the batch in channels-last memory format.
        fixed_size: pad every batch to this `(H, W)` (static shapes: one compiled graph or CUDA graph serves
            every batch); an image that does not fit after resizing raises `ValueError`. None: pad to the
            largest image of the batch.
    """

    def __init__(self, *, min_size: int | Sequence[int] | None = (800,), max_size: int = 1333,
                 test_min_size: int | None = 800, test_max_size: int = 1333,
                 pixel_mean: Sequence[float] = IMAGENET_MEAN, pixel_std: Sequence[float] = IMAGENET_STD,
                 size_divisibility: int = 32, channels_last: bool = False,
                 fixed_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if isinstance(min_size, int):
            min_size = (min_size,)
        self.min_size = tuple(min_size) if min_size else ()
        self.max_size, self.test_min_size, self.test_max_size = max_size, test_min_size, test_max_size
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.size_divisibility = size_divisibility
        self.channels_last = channels_last
        self.fixed_size = fixed_size

    def _target_size(self) -> tuple[float, float] | None:
        if self.training:
            if not self.min_size:
                return None
            if len(self.min_size) == 1:
                return float(self.min_size[0]), float(self.max_size)
            i = int(torch.randint(len(self.min_size), (1,)).item())
            return float(self.min_size[i]), float(self.max_size)
        if not self.test_min_size:
            return None
        return float(self.test_min_size), float(self.test_max_size)

    def forward(self, images: Sequence[Tensor], fixed_size: tuple[int, int] | None = None
                ) -> tuple[Tensor, list[tuple[int, int]], list[float]]:
        """Returns the padded batch `(B, 3, H, W)`, each image's size inside it, and each image's scale.

        `fixed_size` (default `self.fixed_size`) pads to that `(H, W)` instead of the batch's largest image.
        """
        processed, sizes, scales = [], [], []
        for img in images:
            # Any float dtype is a valid input: compute in the model's dtype (that of its buffers), so a
            # float64 or half image does not fail inside the first convolution. A no-op for fp32 inputs.
            img = img.to(self.pixel_mean.dtype)
            img = (img - self.pixel_mean.to(img.device)) / self.pixel_std.to(img.device)
            h, w = img.shape[-2:]
            target = self._target_size()
            scale = 1.0
            if target is not None:
                scale = resize_scale(h, w, *target)
                img = F.interpolate(img[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                                    align_corners=False)[0]
            processed.append(img)
            sizes.append((int(img.shape[-2]), int(img.shape[-1])))
            scales.append(scale)
        d = self.size_divisibility
        max_h = max(s[0] for s in sizes)
        max_w = max(s[1] for s in sizes)
        if d > 1:
            max_h, max_w = int(math.ceil(max_h / d) * d), int(math.ceil(max_w / d) * d)
        fixed_size = fixed_size or self.fixed_size
        if fixed_size is not None:
            fh, fw = int(fixed_size[0]), int(fixed_size[1])
            if max_h > fh or max_w > fw or (d > 1 and (fh % d or fw % d)):
                raise ValueError(f"fixed_size {(fh, fw)} must hold the batch ({max_h} x {max_w} after resizing and "
                                 f"padding) and be a multiple of size_divisibility {d}; choose a larger multiple of "
                                 f"{d} or leave fixed_size None")
            max_h, max_w = fh, fw
        batch = processed[0].new_zeros((len(processed), 3, max_h, max_w))
        for i, img in enumerate(processed):
            batch[i, :, : img.shape[1], : img.shape[2]].copy_(img)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, sizes, scales

    @staticmethod
    def resize_boxes(boxes: Tensor, original: tuple[int, int], new: tuple[int, int]) -> Tensor:
        """Map xyxy boxes from an image of size `original` to one of size `new` (both (h, w))."""
        rh = torch.tensor(new[0], dtype=torch.float32, device=boxes.device) / torch.tensor(
            original[0], dtype=torch.float32, device=boxes.device)
        rw = torch.tensor(new[1], dtype=torch.float32, device=boxes.device) / torch.tensor(
            original[1], dtype=torch.float32, device=boxes.device)
        x1, y1, x2, y2 = boxes.unbind(-1)
        return torch.stack((x1 * rw, y1 * rh, x2 * rw, y2 * rh), dim=-1)

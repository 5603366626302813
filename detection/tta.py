"""Test-time augmentation of a Faster R-CNN: run it at several test sizes, with and without a horizontal flip,
map every run's boxes back to the input image and merge them with one per-class NMS.

`DetectorWithTTA(model, min_sizes=(400, 500, 600), flip=True)` is itself a detector in torchvision's eval
convention (`list[Tensor[3, H, W]] -> list[dict]`, boxes in each input image's pixels), so it goes wherever
the model goes at inference (`inference_on_dataset`, `predict`). For each augmentation (each test size, each
without and, with `flip`, with the flip) the wrapped model runs its whole inference path (resize, backbone,
RPN, box head, per-class NMS) on the augmented images; its boxes come back at the input's size, are un-flipped,
and the boxes and scores of all augmentations are concatenated and filtered once more with the model's own test
settings: score threshold, per-class NMS at its IoU threshold, at most `detections_per_img` per image
(detectron2's `GeneralizedRCNNWithTTA` does the same). Mask R-CNN's variant, which also averages the masks, is
`segmentation.tta.MaskRCNNWithTTA`.

Example::

    model = build_faster_rcnn(...).eval()           # weights loaded
    tta = DetectorWithTTA(model, min_sizes=(224, 256, 288), flip=True)
    detections = tta(images)                         # one dict per image, like model(images)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .boxes import batched_nms_exact
from .faster_rcnn import FasterRCNN
from .preprocess import Preprocessor, check_images

__all__ = ["Augmentation", "DetectorWithTTA", "augmentations", "flip_boxes"]


@dataclass(frozen=True)
class Augmentation:
    """One test-time view of the images: resized to `min_size` / `max_size` (None: the model's own test size),
    horizontally flipped or not."""

    min_size: int | None
    max_size: int | None
    flip: bool


def augmentations(min_sizes: Sequence[int] = (), max_size: int | None = None, flip: bool = False
                  ) -> list[Augmentation]:
    """Every (test size, flip) pair, in that order: `min_sizes=()` is the model's test size alone."""
    sizes: list[int | None] = list(min_sizes) if min_sizes else [None]
    return [Augmentation(s, max_size, f) for s in sizes for f in ((False, True) if flip else (False,))]


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror xyxy boxes left-right in an image `width` pixels wide (its own inverse)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((width - x2, y1, width - x1, y2), dim=-1)


def _check_sizes(min_sizes: Sequence[int], max_size: int | None) -> None:
    if isinstance(min_sizes, int) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                             for s in min_sizes):
        raise ValueError(f"min_sizes={min_sizes!r}: give a sequence of shorter sides in pixels, each > 0 "
                         "(e.g. (400, 500, 600)), or () for the model's test size")
    if len(set(min_sizes)) != len(min_sizes):
        raise ValueError(f"min_sizes={list(min_sizes)} repeats a size; list each once")
    if max_size is not None and (not isinstance(max_size, int) or isinstance(max_size, bool) or max_size <= 0):
        raise ValueError(f"max_size={max_size!r} must be a positive int (pixels), or None for the model's "
                         "test_max_size")


class DetectorWithTTA(nn.Module):
    """A Faster R-CNN run under test-time augmentation; eval only.

    Args:
        model: a `FasterRCNN` (FPN or C4) with its weights; its `roi_heads` test settings (`score_thresh`,
            `nms_thresh`, `detections_per_img`) also filter the merged detections.
        min_sizes: shorter sides to test at; () = the model's `test_min_size`.
        max_size: cap on the longer side; None = the model's `test_max_size`.
        flip: also run each size on the horizontally flipped images.

    With one augmentation (the defaults) the result equals `model(images)`: the merge re-runs NMS on
    detections that already passed it, which keeps every one of them.
    """

    def __init__(self, model: FasterRCNN, *, min_sizes: Sequence[int] = (), max_size: int | None = None,
                 flip: bool = False) -> None:
        super().__init__()
        if not isinstance(model, FasterRCNN):
            raise TypeError(f"test-time augmentation wraps a detection.FasterRCNN, got {type(model).__name__}")
        _check_sizes(min_sizes, max_size)
        if not min_sizes and max_size is not None and not model.preprocessor.test_min_size:
            raise ValueError(f"max_size={max_size}: this model does not resize at test time (its test_min_size "
                             f"is {model.preprocessor.test_min_size!r}), so a cap alone changes nothing; give "
                             "min_sizes too")
        self.model = model
        self.augmentations = augmentations(min_sizes, max_size, flip)
        self._nonfinite: list[int] = []

    # ------------------------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _resized_as(self, aug: Augmentation) -> Iterator[None]:
        """The model's preprocessor resizes to `aug`'s test size inside the block (restored after)."""
        pre: Preprocessor = self.model.preprocessor
        saved = pre.test_min_size, pre.test_max_size
        if aug.min_size is not None:
            pre.test_min_size = aug.min_size
        if aug.max_size is not None:
            pre.test_max_size = aug.max_size
        try:
            yield
        finally:
            pre.test_min_size, pre.test_max_size = saved

    @staticmethod
    def _view(images: Sequence[Tensor], aug: Augmentation) -> list[Tensor]:
        return [img.flip(-1) for img in images] if aug.flip else list(images)

    def _detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """The model's boxes, scores and labels for `images`, in their own pixels."""
        return [{k: d[k] for k in ("boxes", "scores", "labels")} for d in self.model(images)]

    def _merge(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The model's test filter on the union of all augmentations' detections of one image."""
        heads = self.model.roi_heads
        keep = (scores > heads.score_thresh).nonzero().squeeze(1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        kept = batched_nms_exact(boxes, scores, labels, heads.nms_thresh)[: heads.detections_per_img]
        return {"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]}

    def detect_merged(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Boxes, scores and labels of every augmentation, in the input images' pixels, merged per image."""
        per_image: list[list[dict[str, Tensor]]] = [[] for _ in images]
        bad: set[int] = set()
        check = getattr(self.model, "nonfinite_images", None)
        for aug in self.augmentations:
            with self._resized_as(aug):
                detections = self._detect(self._view(images, aug))
            if callable(check):
                bad.update(check())
            for i, (img, det) in enumerate(zip(images, detections)):
                if aug.flip:
                    det = {**det, "boxes": flip_boxes(det["boxes"], int(img.shape[-1]))}
                per_image[i].append(det)
        self._nonfinite = sorted(bad)
        merged = []
        for i, dets in enumerate(per_image):
            out = self._merge(*(torch.cat([d[k] for d in dets]) for k in ("boxes", "scores", "labels")))
            if i in bad:  # as the plain model: an image with non-finite outputs gets no detections
                out = {k: v[:0] for k, v in out.items()}
            merged.append(out)
        return merged

    # -------------------------------------------------------------------------------------- API
    def nonfinite_images(self) -> list[int]:
        """Images of the last call for which any augmentation produced non-finite values (they get no
        detections), as `FasterRCNN.nonfinite_images`."""
        return list(self._nonfinite)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> list[dict[str, Tensor]]:
        if self.training or targets is not None:
            raise ValueError("test-time augmentation is for inference: call .eval() on the wrapper and pass "
                             "images only (train the wrapped model itself)")
        check_images(images)
        return self.detect_merged(list(images))

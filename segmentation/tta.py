"""Test-time augmentation of Mask R-CNN: boxes merged as `detection.tta.DetectorWithTTA` does, then the mask head
run on the merged boxes under every augmentation and the mask probabilities averaged.

Per augmentation, the merged boxes (input-image pixels) are mapped into the augmented image (flipped, resized),
the mask head gives each box's `M x M` probabilities of its class there, and a flipped run's masks are mirrored
back (a box mirrored with the image sees its mask mirrored inside it). The average over augmentations is pasted
into the input image once, as the plain model pastes its masks: pasting is linear in the mask, so this equals the
average of the pasted masks, at the input image's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from detection.faster_rcnn import FasterRCNN
from detection.preprocess import Preprocessor, check_images
from detection.roi_heads import RoIHeads
from detection.tta import DetectorWithTTA, flip_boxes

from .mask_head import MaskRoIHeads, paste_masks_in_image
from .models import MaskRCNN

__all__ = ["MaskRCNNWithTTA"]


class MaskRCNNWithTTA(DetectorWithTTA):
    """A Mask R-CNN run under test-time augmentation; eval only. Arguments as `DetectorWithTTA`.

    Each image's dict also holds `masks`, float `[D, 1, H, W]` probabilities at the image's size (the average
    over augmentations; threshold at 0.5), like `MaskRCNN`'s. The backbone runs twice per augmentation (once for
    the boxes, once for the masks of the merged boxes), so no augmentation's feature maps are held while the
    others run.
    """

    def __init__(self, model: MaskRCNN, *, min_sizes: Sequence[int] = (), max_size: int | None = None,
                 flip: bool = False) -> None:
        if not isinstance(model, MaskRCNN) or not isinstance(model.roi_heads, MaskRoIHeads):
            raise TypeError(f"MaskRCNNWithTTA wraps a segmentation.MaskRCNN with a mask head, got "
                            f"{type(model).__name__}; use detection.tta.DetectorWithTTA for boxes only")
        super().__init__(model, min_sizes=min_sizes, max_size=max_size, flip=flip)

    def _detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """The box branch alone (no masks for boxes that the merge may drop)."""
        model = self.model
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, sizes, _ = model.preprocessor(images)
        image_sizes = torch.tensor(sizes, device=batch.device)
        features = model.backbone(batch)
        proposals, valid, _ = model.rpn(features, image_sizes, None, tuple(batch.shape[-2:]))
        detections, _ = RoIHeads.forward(model.roi_heads, features, proposals, valid, image_sizes)
        assert detections is not None
        return FasterRCNN.postprocess(detections, sizes, original_sizes)

    def mask_probabilities(self, images: list[Tensor], detections: list[dict[str, Tensor]]) -> list[Tensor]:
        """`(D_i, 1, M, M)` mask probabilities of each image's boxes (input pixels) and labels, averaged over the
        augmentations (un-flipped)."""
        model = self.model
        heads: MaskRoIHeads = model.roi_heads  # type: ignore[assignment]
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        total: list[Tensor] | None = None
        for aug in self.augmentations:
            with self._resized_as(aug):
                batch, sizes, _ = model.preprocessor(self._view(images, aug))
            features = model.backbone(batch)
            views = []
            for det, o, s in zip(detections, original_sizes, sizes):
                boxes = flip_boxes(det["boxes"], o[1]) if aug.flip else det["boxes"]
                if s != o:
                    boxes = Preprocessor.resize_boxes(boxes, o, s)
                views.append({"boxes": boxes, "labels": det["labels"]})
            heads.predict_masks(features, views)
            masks = [v["masks"].flip(-1) if aug.flip else v["masks"] for v in views]
            total = masks if total is None else [t + m for t, m in zip(total, masks)]
        assert total is not None
        return [t / len(self.augmentations) for t in total]

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> list[dict[str, Tensor]]:
        if self.training or targets is not None:
            raise ValueError("test-time augmentation is for inference: call .eval() on the wrapper and pass "
                             "images only (train the wrapped model itself)")
        check_images(images)
        images = list(images)
        merged = self.detect_merged(images)
        for img, det, probs in zip(images, merged, self.mask_probabilities(images, merged)):
            det["masks"] = paste_masks_in_image(probs, det["boxes"], (int(img.shape[-2]), int(img.shape[-1])))
        return merged

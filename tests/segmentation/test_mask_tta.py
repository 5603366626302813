"""Test-time augmentation of Mask R-CNN (segmentation.tta) on the tiny real model: the identity case equals the
plain model, the boxes are those of the box-only wrapper, and the masks are the average over the augmentations
of each merged box's mask (un-flipped), computed here independently."""

from __future__ import annotations

import pytest
import torch
from seghelpers import tiny_mask_rcnn, tiny_spec

from detection.models import build_faster_rcnn
from detection.tta import DetectorWithTTA
from segmentation.mask_head import paste_masks_in_image
from segmentation.tta import MaskRCNNWithTTA


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = tiny_mask_rcnn().eval()
    # The mask predictor starts near zero (probabilities ~0.5 everywhere); larger weights give masks with
    # structure, so that the views of an augmentation disagree and the average shows.
    with torch.no_grad():
        torch.nn.init.normal_(model.roi_heads.mask_head.predictor.weight, std=0.5)
    return model


def images(seed: int, sizes: tuple[tuple[int, int], ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


# The tiny model tests at shorter side 64, longer side <= 96: these sizes are not resized, the others are.
AT_TEST_SIZE = ((64, 80), (80, 64))
RESIZED = ((72, 96), (100, 80))


@torch.no_grad()
def test_no_augmentation_equals_the_plain_model(model):
    for sizes in (AT_TEST_SIZE, RESIZED):
        imgs = images(0, sizes)
        ref, got = model(imgs), MaskRCNNWithTTA(model).eval()(imgs)
        for r, g in zip(ref, got):
            assert len(r["boxes"]) > 0
            for k in ("boxes", "scores", "labels"):
                assert torch.equal(r[k], g[k]), k
            if sizes == AT_TEST_SIZE:
                assert torch.equal(r["masks"], g["masks"])
            else:
                # measured: 2.4e-6 (the merged boxes, in the input's pixels, are scaled back into the resized
                # image for the mask head: x * o / s * s / o rounds in float32)
                torch.testing.assert_close(g["masks"], r["masks"], rtol=0, atol=1e-5)


@torch.no_grad()
def test_boxes_are_those_of_the_box_wrapper(model):
    """The box-only pass of the mask wrapper gives what the model's full forward gives, so both wrappers merge
    the same detections."""
    imgs = images(1, RESIZED)
    boxes_only = DetectorWithTTA(model, flip=True, min_sizes=(56, 64)).eval()(imgs)
    with_masks = MaskRCNNWithTTA(model, flip=True, min_sizes=(56, 64)).eval()(imgs)
    for b, m in zip(boxes_only, with_masks):
        assert len(b["boxes"]) > 0
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(b[k], m[k]), k
    assert [tuple(m["masks"].shape) for m in with_masks] == [(len(m["boxes"]), 1, h, w)
                                                             for m, (h, w) in zip(with_masks, RESIZED)]


def roi_masks(model, images: list[torch.Tensor], boxes: list[torch.Tensor], labels: list[torch.Tensor], *,
              flip: bool) -> list[torch.Tensor]:
    """Each box's mask probabilities of its label, computed on the (flipped) images at the model's test size, in
    the box's frame of the un-flipped image: the test's own pipeline."""
    heads = model.roi_heads
    views = [img.flip(-1) for img in images] if flip else images
    batch, sizes, _ = model.preprocessor(views)
    features = model.backbone(batch)
    rois, index = [], []
    for i, (img, b, s) in enumerate(zip(images, boxes, sizes)):
        h, w = img.shape[-2:]
        if flip:
            b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        scale = torch.tensor([s[1] / w, s[0] / h, s[1] / w, s[0] / h])
        rois.append(b * scale)
        index.append(torch.full((len(b),), i))
    logits = heads.mask_logits(features, torch.cat(rois), torch.cat(index))
    probs = logits[torch.arange(len(logits)), torch.cat(labels)].sigmoid()
    if flip:
        probs = probs.flip(-1)
    return list(probs.split([len(b) for b in boxes]))


@torch.no_grad()
def test_flip_tta_masks_are_the_average_of_both_views(model):
    imgs = images(2, RESIZED)
    got = MaskRCNNWithTTA(model, flip=True).eval()(imgs)
    boxes, labels = [d["boxes"] for d in got], [d["labels"] for d in got]
    plain = roi_masks(model, imgs, boxes, labels, flip=False)
    mirrored = roi_masks(model, imgs, boxes, labels, flip=True)
    for img, d, p, m in zip(imgs, got, plain, mirrored):
        size = tuple(img.shape[-2:])
        assert len(d["boxes"]) > 0
        average = paste_masks_in_image((p + m) / 2, d["boxes"], size)
        assert torch.equal(d["masks"], average)
        # Pasting is linear in the mask: the average of the two pasted views is the same image.
        pasted = (paste_masks_in_image(p, d["boxes"], size) + paste_masks_in_image(m, d["boxes"], size)) / 2
        torch.testing.assert_close(d["masks"], pasted, rtol=0, atol=1e-6)  # measured: 1.2e-7 (float32 sums)
        # ...and differs from either view alone (the views disagree: the padding is not mirrored).
        assert (d["masks"] - paste_masks_in_image(p, d["boxes"], size)).abs().max() > 0.05  # measured: 0.23, 0.27


def test_wraps_mask_rcnn_only():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"wraps a segmentation\.MaskRCNN.*DetectorWithTTA for boxes only"):
        MaskRCNNWithTTA(build_faster_rcnn(tiny_spec()))

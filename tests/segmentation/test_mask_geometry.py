"""Mask targets (RoIAlign crops of the ground truth) and paste-back, against hand-built examples."""

from __future__ import annotations

import pytest
import seghelpers as H
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

from detection.structures import GroundTruth
from segmentation import crop_mask_targets, mask_loss, paste_masks_in_image


def pattern_mask(h: int, w: int) -> torch.Tensor:
    """A non-symmetric binary pattern: a rectangle and a diagonal, so any shift or flip shows."""
    m = torch.zeros((h, w), dtype=torch.uint8)
    m[10:21, 8:30] = 1
    idx = torch.arange(min(h, w))
    m[idx, idx] = 1
    return m


# ------------------------------------------------------------------------------------------ targets
def test_crop_of_a_box_the_size_of_the_grid_copies_the_pixels():
    # A 28-pixel box on a 28x28 grid: each bin is one pixel, sampled at its centre, so the target is
    # exactly the mask's pixels inside the box.
    mask = pattern_mask(40, 40)
    boxes = torch.tensor([[6.0, 4.0, 34.0, 32.0]])
    out = crop_mask_targets([mask[None]], boxes, torch.tensor([0]), torch.tensor([0]), 28)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    assert torch.equal(out[0], mask[4:32, 6:34].float())


def test_crop_of_a_box_twice_the_grid_averages_2x2_blocks():
    # Mask: ones at x in [10, 31), y in [4, 40) of a 64x64 image; box [0, 0, 56, 56] on a 28x28 grid.
    # Each bin covers 2x2 pixels and samples both pixel centres per axis (adaptive sampling: 2), so
    # target[i, j] = mean of pixels (2i..2i+1, 2j..2j+1):
    #   columns: j = 5..14 -> pixels 10..29, all inside -> 1; j = 15 -> pixels 30 (in), 31 (out) -> 0.5
    #   rows:    i = 2..19 -> pixels 4..39 inside -> 1; other rows -> 0.
    mask = torch.zeros((2, 64, 64), dtype=torch.uint8)
    mask[1, 4:40, 10:31] = 1
    out = crop_mask_targets([mask], torch.tensor([[0.0, 0.0, 56.0, 56.0]]), torch.tensor([0]), torch.tensor([1]), 28)
    col = torch.zeros(28)
    col[5:15] = 1.0
    col[15] = 0.5
    row = torch.zeros(28)
    row[2:20] = 1.0
    # measured: 0 (0, 0.5 and 1 come out exact); 1e-6 left for float32 bilinear weights on other CPUs
    torch.testing.assert_close(out[0], row[:, None] * col[None, :], rtol=0, atol=1e-6)


def test_crop_picks_each_rois_image_and_mask():
    a = pattern_mask(40, 40)
    b = torch.flip(pattern_mask(40, 48), dims=(1,))
    masks = [torch.stack([torch.zeros_like(a), a]), torch.stack([b])]
    boxes = torch.tensor([[6.0, 4.0, 34.0, 32.0], [0.0, 0.0, 28.0, 28.0], [10.0, 12.0, 38.0, 40.0]])
    image_index = torch.tensor([1, 0, 1])  # not sorted by image on purpose
    mask_index = torch.tensor([0, 1, 0])
    out = crop_mask_targets(masks, boxes, image_index, mask_index, 28)
    assert torch.equal(out[0], b[4:32, 6:34].float())
    assert torch.equal(out[1], a[0:28, 0:28].float())
    assert torch.equal(out[2], b[12:40, 10:38].float())


def test_mask_loss_crops_at_the_original_size_of_a_resized_image():
    # The image is 40x40 but the model saw it at 80x80: a RoI [12, 8, 68, 64] in the resized image is
    # [6, 4, 34, 32] in the original, where the ground-truth mask lives, so the target is the original
    # mask's pixels in that box (the first test), and the RoI's own class channel is scored.
    torch.manual_seed(0)
    heads = H.tiny_mask_rcnn().roi_heads
    features = {f"p{k}": torch.randn(1, 16, 80 // 2**k, 80 // 2**k) for k in range(2, 7)}
    mask = pattern_mask(40, 40)
    gt = GroundTruth(boxes=torch.tensor([[0.0, 0.0, 20.0, 20.0], [12.0, 8.0, 68.0, 64.0]]),
                     labels=torch.tensor([1, 2]), image_index=torch.tensor([0, 0]), num_images=1, counts=[2],
                     masks=[torch.stack([torch.zeros_like(mask), mask])], image_sizes=[(80, 80)],
                     original_sizes=[(40, 40)])
    roi = torch.tensor([12.0, 8.0, 68.0, 64.0])
    sampled = {"boxes": torch.stack([roi, torch.tensor([0.0, 0.0, 30.0, 30.0])])[None],
               "fg": torch.tensor([[True, False]]), "valid": torch.tensor([[True, True]]),
               "labels": torch.tensor([[2, 0]]), "matched": torch.tensor([[1, 0]])}
    loss = heads.mask_losses(features, sampled, gt)
    logits = heads.mask_logits(features, roi[None], torch.tensor([0]))
    expected = mask_loss(logits, torch.tensor([2]), mask[4:32, 6:34].float()[None])
    # measured: 0 (the same logits, an exactly cropped target); assert_close's fp32 defaults
    torch.testing.assert_close(loss, expected)
    wrong_class = mask_loss(logits, torch.tensor([1]), mask[4:32, 6:34].float()[None])
    # measured: the two losses differ by 3.2e-4 (4.6e-4 relative), 30x allclose's default tolerance
    assert not torch.allclose(loss, wrong_class)


# -------------------------------------------------------------------------------------------- paste
# An all-ones 28x28 mask pasted at box [10, 20, 38, 48]. torchvision's rule: pad the mask to 30x30 with
# zeros, grow the box by 30/28 about its centre (24, 34): half-sides 14 * 30/28 = 15 -> [9, 19, 39, 49],
# resize the padded mask to those 31 x 31 pixels (bilinear, align_corners=False): pixel at offset p in
# the box reads the padded mask at src = (p + 0.5) * 30/31 - 0.5 (clamped at 0):
#   p = 0  (x = 9):  src < 0 -> padded[0] = 0
#   p = 1  (x = 10): src = 59/62 -> (1 - 59/62) * padded[0] + 59/62 * padded[1] = 59/62
#   p = 2..28:       both neighbours inside -> 1
#   p = 29 (x = 38): src = 28 + 3/62 -> (1 - 3/62) * 1 + 3/62 * padded[29] = 59/62
#   p = 30 (x = 39): src > 29 -> padded[29] = 0
# so the pasted mask is f(y) * f(x) with f = 59/62 at the first and last pixel of [10, 38], 1 between.
EDGE = 59 / 62


def profile(lo: int, hi: int, size: int) -> torch.Tensor:
    f = torch.zeros(size)
    f[max(lo, 0):hi + 1] = 1.0
    for x in (lo, hi):
        if 0 <= x < size:
            f[x] = EDGE
    return f


def test_paste_of_a_full_mask_matches_the_hand_computed_profile():
    out = paste_masks_in_image(torch.ones(1, 1, 28, 28), torch.tensor([[10.0, 20.0, 38.0, 48.0]]), (60, 70))
    assert out.shape == (1, 1, 60, 70) and out.dtype == torch.float32
    expected = profile(20, 48, 60)[:, None] * profile(10, 38, 70)[None, :]
    # measured: 2.8e-6 (float32 resize weights vs the exact 59/62 profile)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-5)  # float32 weights
    # Thresholded at 0.5: the box's pixels 10..38 x 20..48 (torchvision's one-pixel-wider convention).
    binary = torch.zeros(60, 70, dtype=torch.bool)
    binary[20:49, 10:39] = True
    assert torch.equal(out[0, 0] >= 0.5, binary)


def test_paste_clips_a_box_that_leaves_the_image():
    # Box [-10, -10, 18, 18]: grown to [-11, -11, 19, 19]; the profile's first pixel (-10) is outside the
    # image, so rows/columns 0..17 are 1, 18 is 59/62, and beyond is 0.
    out = paste_masks_in_image(torch.ones(1, 28, 28), torch.tensor([[-10.0, -10.0, 18.0, 18.0]]), (30, 30))
    f = torch.zeros(30)
    f[:18] = 1.0
    f[18] = EDGE
    # measured: 2.8e-6 (float32 resize weights vs the exact 59/62 profile)
    torch.testing.assert_close(out[0, 0], f[:, None] * f[None, :], rtol=0, atol=1e-5)


def test_paste_puts_the_left_columns_on_the_left():
    # Mask columns 0..9 set (padded: 1..10); box grown to x in [19, 49] (31 pixels): pixel x = 19 + p reads
    # src = (p + 0.5) * 30/31 - 0.5, which is >= 0.5 inside for p = 1..10 (x = 20..29; at p = 11 the
    # value is 1 - 0.629 < 0.5), and rows 10..38 as in the full-mask example.
    mask = torch.zeros(1, 28, 28)
    mask[:, :, :10] = 1.0
    out = paste_masks_in_image(mask, torch.tensor([[20.0, 10.0, 48.0, 38.0]]), (50, 60))[0, 0] >= 0.5
    expected = torch.zeros(50, 60, dtype=torch.bool)
    expected[10:39, 20:30] = True
    assert torch.equal(out, expected)


def test_paste_equals_torchvisions_per_roi_paste():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 1, 28, 28, generator=g)
    xy = torch.rand(40, 2, generator=g) * 100 - 20  # some boxes start outside the image (all overlap it)
    wh = torch.rand(40, 2, generator=g) * 90 + 0.5  # tiny to larger than the image
    boxes = torch.cat([xy, xy + wh], dim=1)
    # Detections are clipped to the image: keep boxes that overlap it (torchvision fails on the others).
    keep = (boxes[:, 2] > 1) & (boxes[:, 3] > 1)
    masks, boxes = masks[keep], boxes[keep]
    assert len(boxes) >= 30
    ours = paste_masks_in_image(masks, boxes, (90, 110))
    ref = tv_paste(masks, boxes, (90, 110))
    # measured: 8.9e-7 over 90x110 pixels of 34 random masks (float32, another interpolation order)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_paste_of_no_masks_is_empty_and_bad_boxes_are_named():
    assert paste_masks_in_image(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (20, 30)).shape == (0, 1, 20, 30)
    with pytest.raises(ValueError, match=r"boxes has shape \(2, 5\), expected \(3, 4\)"):
        paste_masks_in_image(torch.zeros(3, 1, 28, 28), torch.zeros(2, 5), (20, 30))

"""Drawing through torchvision's utilities: boxes, labels, scores, masks, semantic maps, ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.visualize import colour_for, draw_instances, side_by_side, to_pil


def grey(h: int = 60, w: int = 80) -> torch.Tensor:
    return torch.full((3, h, w), 100, dtype=torch.uint8)


def pixel(img: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in img[:, y, x])


def test_boxes_are_drawn_in_their_class_colour_and_low_scores_are_not() -> None:
    out = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0], [55.0, 5.0, 75.0, 25.0]]),
           "labels": torch.tensor([3, 5]), "scores": torch.tensor([0.9, 0.2])}
    img = draw_instances(grey(), out, score_thresh=0.5)
    assert pixel(img, 25, 10) == colour_for(3)          # left edge of the kept box
    assert pixel(img, 15, 75) == (100, 100, 100)         # right edge of the dropped box: untouched
    assert pixel(img, 55, 5) == (100, 100, 100)          # far from any box
    # The label (name and score) is rendered: the drawing differs from the one without text.
    plain = draw_instances(grey(), {**out, "labels": torch.tensor([3, 5])}, class_names=None)
    named = draw_instances(grey(), out, class_names=["bg", "a", "b", "a much longer name", "c", "d"])
    assert not torch.equal(plain, named)


def test_ground_truth_without_scores_draws_every_instance() -> None:
    gt = {"boxes": torch.tensor([[55.0, 5.0, 75.0, 25.0]]), "labels": torch.tensor([5])}
    img = draw_instances(grey(), gt, score_thresh=0.99)
    assert pixel(img, 15, 75) == colour_for(5)


def test_masks_and_semantic_regions_are_blended_only_where_they_are() -> None:
    masks = torch.zeros(1, 1, 60, 80)
    masks[0, 0, 20:30, 20:30] = 0.9
    out = {"boxes": torch.tensor([[2.0, 2.0, 78.0, 58.0]]), "labels": torch.tensor([2]),  # label text far from (25, 25)
           "scores": torch.tensor([0.8]), "masks": masks}
    img = draw_instances(grey(), out, mask_alpha=0.5, box_width=1)
    inside, outside = pixel(img, 25, 25), pixel(img, 45, 60)
    expected = tuple(round(0.5 * 100 + 0.5 * c) for c in colour_for(2))
    # measured: 1 level on each channel ((137, 177, 81) vs (138, 178, 82)): the blend's uint8 conversion (torchvision's
    # draw_segmentation_masks) lands one level below round()
    assert all(abs(a - b) <= 1 for a, b in zip(inside, expected)), (inside, expected)
    assert outside == (100, 100, 100)
    sem = torch.zeros(60, 80, dtype=torch.int64)
    sem[:10] = 255
    sem[40:] = 4
    img = draw_instances(grey(), {"sem_seg": sem})
    assert pixel(img, 5, 5) == (100, 100, 100) and pixel(img, 20, 5) == (100, 100, 100)
    assert pixel(img, 50, 5) != (100, 100, 100)


def test_numpy_hwc_input_float_input_and_side_by_side() -> None:
    arr = np.full((60, 80, 3), 100, dtype=np.uint8)
    a = draw_instances(arr, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
    assert torch.equal(a, grey())
    b = draw_instances(grey().float() / 255, {})
    assert b.dtype == torch.uint8 and b.shape == (3, 60, 80)
    both = side_by_side(a, grey(30, 20), gap=4)
    assert both.shape == (3, 60, 104) and int(both[0, 45, 90]) == 255   # padding under the short image
    assert to_pil(both).size == (104, 60)


def test_bad_inputs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"masks are \[10, 10\] but the image is 60x80"):
        draw_instances(grey(), {"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.int64),
                                "masks": torch.ones(1, 10, 10)})
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        draw_instances(np.zeros((4, 4), dtype=np.uint8), {})
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        draw_instances(torch.zeros(1, 4, 4, dtype=torch.uint8), {})

"""Bad training inputs raise ValueError naming the image, the field and what is expected."""

from __future__ import annotations

import pytest
import seghelpers as H
import torch


def test_masks_of_the_wrong_shape_name_the_image():
    model = H.tiny_mask_rcnn()
    images, targets = H.toy_batch()
    targets[1]["masks"] = targets[1]["masks"][:, :50]  # half the image's height
    with pytest.raises(ValueError, match=r"targets\[1\]\['masks'\] has shape \(1, 50, 80\), expected \[1, 100, 80\]"):
        model(images, targets)


def test_one_mask_too_many_names_the_image():
    model = H.tiny_mask_rcnn()
    images, targets = H.toy_batch()
    targets[0]["masks"] = torch.cat([targets[0]["masks"], targets[0]["masks"][:1]])
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\] has shape \(3, 72, 96\), expected \[2, 72, 96\]"):
        model(images, targets)


def test_missing_masks_name_the_image():
    model = H.tiny_mask_rcnn()
    images, targets = H.toy_batch()
    del targets[1]["masks"]
    with pytest.raises(ValueError, match=r"targets\[1\] has no 'masks'.*with_masks=True"):
        model(images, targets)


def test_semantic_map_of_the_wrong_shape_names_the_image():
    model = H.tiny_semantic_fpn()
    images, targets = H.toy_batch()
    targets[1]["sem_seg"] = targets[1]["sem_seg"].t()
    with pytest.raises(ValueError, match=r"targets\[1\]\['sem_seg'\] has shape \(80, 100\), expected \[100, 80\]"):
        model(images, targets)


def test_semantic_labels_out_of_range_name_the_image_and_the_values():
    model = H.tiny_panoptic_fpn()
    images, targets = H.toy_batch()
    targets[0]["sem_seg"][0, 0] = 7
    with pytest.raises(ValueError, match=r"targets\[0\]\['sem_seg'\] has labels \[7\] outside 0..3"):
        model(images, targets)


def test_float_semantic_map_and_missing_semantic_map_are_rejected():
    model = H.tiny_semantic_fpn()
    images, targets = H.toy_batch()
    targets[0]["sem_seg"] = targets[0]["sem_seg"].float()
    with pytest.raises(ValueError, match=r"targets\[0\]\['sem_seg'\] has dtype torch.float32"):
        model(images, targets)
    del targets[0]["sem_seg"]
    with pytest.raises(ValueError, match=r"targets\[0\] has no 'sem_seg'"):
        model(images, targets)

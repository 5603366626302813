"""Empty images and batches without a positive RoI train with finite losses, and every trainable
parameter receives a gradient (DDP runs without `find_unused_parameters`)."""

from __future__ import annotations

import math

import seghelpers as H
import torch


def assert_every_parameter_has_a_gradient(model: torch.nn.Module, losses: dict[str, torch.Tensor]) -> None:
    for k, v in losses.items():
        assert math.isfinite(float(v.detach())), f"{k} = {float(v.detach())}"
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


def test_mask_rcnn_batch_of_empty_images_gives_every_parameter_a_gradient():
    model = H.tiny_mask_rcnn()
    images, targets = H.toy_batch(empty=True)  # no box at all: no positive RoI in the batch
    losses = model(images, targets)
    assert float(losses["loss_mask"].detach()) == 0.0
    assert_every_parameter_has_a_gradient(model, losses)
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() == 0  # zero, but present


def test_mask_rcnn_batch_with_an_empty_image_gives_every_parameter_a_gradient():
    model = H.tiny_mask_rcnn()
    images, targets = H.toy_batch()
    targets[1] = H.rect_target(100, 80, [])
    losses = model(images, targets)
    assert float(losses["loss_mask"].detach()) > 0
    assert_every_parameter_has_a_gradient(model, losses)


def test_semantic_fpn_all_ignored_targets_give_every_parameter_a_gradient():
    model = H.tiny_semantic_fpn()
    images, targets = H.toy_batch()
    for t in targets:
        t["sem_seg"] = torch.full_like(t["sem_seg"], 255)
    losses = model(images, targets)
    assert float(losses["loss_sem_seg"].detach()) == 0.0
    assert_every_parameter_has_a_gradient(model, losses)


def test_panoptic_fpn_with_masks_on_empty_images_gives_every_parameter_a_gradient():
    model = H.tiny_panoptic_fpn(with_masks=True)
    images, targets = H.toy_batch(empty=True)
    losses = model(images, targets)
    assert {"loss_mask", "loss_sem_seg"} <= set(losses)
    assert_every_parameter_has_a_gradient(model, losses)

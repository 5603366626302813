"""Shapes and losses of the mask head, the semantic head and the three models (train and eval)."""

from __future__ import annotations

import math

import seghelpers as H
import torch

from resnet_det.data.coco import CocoDetection
from segmentation import MaskRCNNHead, SemanticFPNHead, semantic_loss
from segmentation.semantic_head import prepare_semantic_targets, semantic_inference


def test_mask_head_maps_14x14_rois_to_28x28_class_masks():
    head = MaskRCNNHead(16, 5, num_convs=4, conv_dim=8)
    assert len(head.convs) == 4 and head.deconv.stride == (2, 2) and head.predictor.kernel_size == (1, 1)
    assert head(torch.randn(7, 16, 14, 14)).shape == (7, 5, 28, 28)


def test_semantic_head_stages_and_output_resolution():
    head = SemanticFPNHead(("p2", "p3", "p4", "p5"), (4, 8, 16, 32), 16, 6, conv_dims=8)
    # P2: one conv, no upsampling; P3..P5: 1..3 conv + 2x-upsampling stages down to stride 4.
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in h.modules()) for h in head.scale_heads]
    ups = [sum(isinstance(m, torch.nn.Upsample) for m in h.modules()) for h in head.scale_heads]
    assert convs == [1, 1, 2, 3] and ups == [0, 1, 2, 3]
    assert all(isinstance(m, torch.nn.GroupNorm) for h in head.scale_heads for m in h.modules()
               if "norm" in type(m).__name__.lower())
    feats = {f"p{k}": torch.randn(2, 16, 64 // 2**k, 96 // 2**k) for k in (2, 3, 4, 5)}
    assert head(feats).shape == (2, 6, 64, 96)


def test_mask_rcnn_losses_and_outputs():
    model = H.tiny_mask_rcnn()
    images, targets = H.toy_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    for k, v in losses.items():
        assert v.dim() == 0 and v.dtype == torch.float32 and math.isfinite(float(v.detach())), k
    # An untrained mask head predicts ~0.5 everywhere: the BCE starts near log(2).
    assert abs(float(losses["loss_mask"].detach()) - math.log(2)) < 0.05
    model.eval()
    with torch.no_grad():
        out = model(images)
    for img, o in zip(images, out):
        d = len(o["boxes"])
        assert d > 0
        assert o["masks"].shape == (d, 1, *img.shape[-2:]) and o["masks"].dtype == torch.float32
        assert float(o["masks"].min()) >= 0.0 and float(o["masks"].max()) <= 1.0
        # Pasted inside each (grown, integer) box only: nothing far outside the box.
        for box, m in zip(o["boxes"], o["masks"][:, 0]):
            x1, y1, x2, y2 = box.tolist()
            outside = torch.ones_like(m, dtype=torch.bool)
            outside[max(int(y1) - 3, 0):int(y2) + 4, max(int(x1) - 3, 0):int(x2) + 4] = False
            assert not (m[outside] > 0).any()


def test_semantic_fpn_loss_and_outputs():
    model = H.tiny_semantic_fpn()
    images, targets = H.toy_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_sem_seg"}
    loss = losses["loss_sem_seg"]
    assert loss.dtype == torch.float32 and math.isfinite(float(loss.detach()))
    # Random init: the cross-entropy is of the order of log(num_classes).
    assert 0.2 * math.log(H.NUM_CLASSES) < float(loss.detach()) < 5 * math.log(H.NUM_CLASSES)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert [set(o) for o in out] == [{"sem_seg"}, {"sem_seg"}]
    for img, o in zip(images, out):
        assert o["sem_seg"].shape == img.shape[-2:] and o["sem_seg"].dtype == torch.int64
        assert int(o["sem_seg"].min()) >= 0 and int(o["sem_seg"].max()) < H.NUM_CLASSES


def test_panoptic_fpn_losses_and_outputs():
    model = H.tiny_panoptic_fpn()
    images, targets = H.toy_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_sem_seg"}
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    for img, o in zip(images, out):
        assert {"boxes", "scores", "labels", "sem_seg"} <= set(o)
        assert o["sem_seg"].shape == img.shape[-2:] and o["sem_seg"].dtype == torch.int64


def test_semantic_loss_weight_scales_the_panoptic_loss():
    images, targets = H.toy_batch()
    model = H.tiny_panoptic_fpn()
    model.semantic_loss_weight = 1.0
    one = model(images, targets)["loss_sem_seg"]  # the semantic branch does not sample: deterministic
    model.semantic_loss_weight = 0.25
    # measured: 0 (the semantic loss times its weight: exact); assert_close's fp32 defaults
    torch.testing.assert_close(model(images, targets)["loss_sem_seg"], 0.25 * one)


def test_semantic_targets_follow_the_resize_with_nearest_and_ignore_padding():
    # A 2x4 label map resized to 4x8 (scale 2) and padded to 6x8: each label becomes a 2x2 block, the pad
    # rows are 255.
    sem = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    out = prepare_semantic_targets([{"sem_seg": sem}], [(4, 8)], [(2, 4)], (6, 8), 255, torch.device("cpu"))
    expected = torch.full((1, 6, 8), 255, dtype=torch.int64)
    expected[0, :4] = sem.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(out, expected)


def test_semantic_loss_ignores_255_and_is_zero_when_all_ignored():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.tensor([[[0, 255], [2, 255]]])
    expected = torch.nn.functional.cross_entropy(logits[0].permute(1, 2, 0)[[0, 1], [0, 0]], torch.tensor([0, 2]))
    # measured: 0; assert_close's fp32 defaults
    torch.testing.assert_close(semantic_loss(logits, target, 255), expected)
    empty = semantic_loss(logits, torch.full((1, 2, 2), 255), 255)
    assert float(empty.detach()) == 0.0
    empty.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_semantic_inference_returns_labels_at_the_original_size():
    # Logits of a 4x6 resized image inside an 8x8 padded batch, from an original 8x12 image: argmax of
    # one-hot logits, cropped and resized back, gives the left/right halves' labels at 8x12.
    logits = torch.full((1, 3, 8, 8), -10.0)
    logits[0, 1, :4, :3] = 10.0
    logits[0, 2, :4, 3:6] = 10.0
    logits[0, 0, 4:] = 50.0  # padding: must be cropped away
    out = semantic_inference(logits, [(4, 6)], [(8, 12)])[0]
    expected = torch.ones(8, 12, dtype=torch.int64)
    expected[:, 6:] = 2
    assert out.dtype == torch.int64 and torch.equal(out, expected)


def test_dataset_semantic_targets_from_coco_instances(tiny_coco_src):
    # COCO without semantic PNGs: sem_seg is painted from the instance masks (thing classes +
    # background, crowd = 255), the labels the semantic head predicts.
    ds = CocoDetection(tiny_coco_src / "images", tiny_coco_src / "annotations.json", training=False,
                       with_masks=True, with_semantic=True)
    _, t = ds[0]
    sem, masks, labels = t["sem_seg"], t["masks"], t["labels"]
    assert sem.dtype == torch.int64 and sem.shape == masks.shape[1:]
    painted = set(torch.unique(sem).tolist()) - {0, 255}
    assert painted and painted <= set(labels.tolist())
    assert (sem[masks.bool().any(0)] != 0).all()

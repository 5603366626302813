"""Training math equals torchvision's: the same converted Faster R-CNN on the same images and targets
gives the same four losses and the same gradient for every parameter.

Both samplers pick at random (differently), so the test makes sampling exhaustive: batch sizes larger
than the candidate sets and a positive fraction of 1 make every labelled anchor and every labelled
proposal part of the loss, in both libraries. What remains is deterministic: resizing, anchors,
proposal selection (top-k, decoding, clipping, NMS), matching (incl. low-quality matches), adding the
ground truth to the proposals, box encoding, RoIAlign level mapping and the loss normalisations.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from backbone import FrozenBatchNorm2d
from detection.convert import convert_torchvision_detection, load_torchvision_detector
from detection.models import build_faster_rcnn, torchvision_spec

pytestmark = pytest.mark.usefixtures("single_thread")

EVERYTHING = 100_000  # larger than any candidate set: exhaustive sampling


def test_losses_and_gradients_equal_torchvision() -> None:
    torch.manual_seed(0)
    ref = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=192,
        rpn_pre_nms_top_n_train=150, rpn_post_nms_top_n_train=200, rpn_batch_size_per_image=EVERYTHING,
        rpn_positive_fraction=1.0, box_batch_size_per_image=EVERYTHING, box_positive_fraction=1.0)
    # Frozen, non-trivial BN statistics in the trunk (as when fine-tuning a checkpoint): no batch statistics.
    FrozenBatchNorm2d.convert(ref.backbone.body)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    ours = build_faster_rcnn(torchvision_spec("fasterrcnn_resnet50_fpn", num_classes=5).replace(
        min_size=(128,), max_size=192, rpn_pre_nms_topk=(150, 1000), rpn_post_nms_topk=(200, 1000),
        rpn_batch_size_per_image=EVERYTHING, rpn_positive_fraction=1.0, roi_batch_size_per_image=EVERYTHING,
        roi_positive_fraction=1.0))
    load_torchvision_detector(ours, ref.state_dict())

    images = [torch.rand(3, 100, 120, generator=g), torch.rand(3, 140, 110, generator=g)]  # both get resized
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 30.0, 115.0, 95.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[5.0, 40.0, 90.0, 130.0]]), "labels": torch.tensor([4])},
    ]
    ref.train()
    ours.train()
    expected = ref(images, [dict(t) for t in targets])
    got = ours(images, targets)
    names = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_box", "loss_classifier": "loss_cls",
             "loss_box_reg": "loss_box_reg"}
    assert set(got) == set(names.values())
    for tv_name, name in names.items():
        assert expected[tv_name] > 0
        torch.testing.assert_close(got[name], expected[tv_name], rtol=1e-5, atol=1e-7, msg=name)

    sum(expected.values()).backward()
    sum(got.values()).backward()
    tv_grads = convert_torchvision_detection({k: p.grad for k, p in ref.named_parameters() if p.grad is not None})
    our_grads = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    assert set(tv_grads) == set(our_grads) and len(our_grads) > 60
    for k, grad in our_grads.items():
        scale = tv_grads[k].abs().max()
        assert scale > 0, k
        # 1e-3 of the largest entry: our training convolutions fold the frozen BN into their weights
        # (conv(x, W*s) + b instead of conv(x, W)*s + b), which rounds differently in fp32; the error
        # builds up towards the stem (~3e-4 there). A wrong mapping or formula gives O(1) differences.
        assert (grad - tv_grads[k]).abs().max() <= 1e-3 * scale, f"gradient of {k}"

"""Training math equals torchvision's: the same converted Faster R-CNN on the same images and targets
gives the same four losses and the same gradient for every parameter.

The reference is torchvision's own model, built as ``fasterrcnn_resnet50_fpn`` builds it, with torchvision's
own ``FrozenBatchNorm2d`` (``torchvision.ops.misc``) in the trunk: nothing of this project is in it.

Both samplers pick at random (differently), so the test makes sampling exhaustive: batch sizes larger
than the candidate sets and a positive fraction of 1 make every labelled anchor and every labelled
proposal part of the loss, in both libraries. What remains is deterministic: resizing, anchors,
proposal selection (top-k, decoding, clipping, NMS), matching (incl. low-quality matches), adding the
ground truth to the proposals, box encoding, RoIAlign level mapping and the loss normalisations.

Frozen BN in training: our convolutions fold a frozen BN into their weights on the fly in training mode
(``conv(x, W * s) + b`` instead of ``conv(x, W) * s + b``; ``backbone.layers.Conv2d``), and run the two ops
as torchvision does in eval mode. The first test compares torchvision's order with torchvision's order
(the folding convolutions set to eval mode: the detector itself trains), at 1e-4 of the largest gradient
entry. The second proves the fold is exact arithmetic (float64) and measures what its different float32
rounding does to the whole detector's gradients (see the numbers there). The third checks the path training
really takes (the fold on, float32) against torchvision's backbone and FPN computed in float64, at 1e-5 of the
largest gradient entry (measured: 1.35e-6 at most over six seeds; torchvision's own float32 order is within
1.5e-6 of the same reference).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBN

from backbone import Conv2d, FrozenBatchNorm2d
from detection.convert import convert_torchvision_detection, load_torchvision_detector
from detection.models import build_faster_rcnn, torchvision_spec

pytestmark = pytest.mark.usefixtures("single_thread")

EVERYTHING = 100_000  # larger than any candidate set: exhaustive sampling
# torchvision's loss names, which ours are too (a torchvision training loop reads them unchanged).
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")


def _models_and_batch():
    torch.manual_seed(0)
    # What torchvision's fasterrcnn_resnet50_fpn builds for a trained checkpoint: FrozenBatchNorm2d in the trunk;
    # every stage trainable (trainable_layers=5) so that every converted parameter gets a gradient.
    trunk = torchvision.models.resnet50(weights=None, norm_layer=TorchvisionFrozenBN)
    ref = FasterRCNN(
        _resnet_fpn_extractor(trunk, 5), num_classes=5, min_size=128, max_size=192, rpn_pre_nms_top_n_train=150,
        rpn_post_nms_top_n_train=200, rpn_batch_size_per_image=EVERYTHING, rpn_positive_fraction=1.0,
        box_batch_size_per_image=EVERYTHING, box_positive_fraction=1.0)
    # Non-trivial frozen statistics (as when fine-tuning a checkpoint).
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, TorchvisionFrozenBN):
                n = m.weight.numel()
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
    return ref, ours, images, targets


def _folding_convs(model: torch.nn.Module) -> list[Conv2d]:
    return [m for m in model.modules() if isinstance(m, Conv2d) and isinstance(m.norm, FrozenBatchNorm2d)]


def _losses_and_grads(ref, ours, images, targets, *, fold: bool):
    ref.train()
    ours.train()
    if not fold:
        for conv in _folding_convs(ours):
            conv.eval()  # conv, then frozen BN: torchvision's order (the detector and its losses stay in training)
    expected = ref(images, [dict(t) for t in targets])
    got = ours(images, targets)
    sum(expected.values()).backward()
    sum(got.values()).backward()
    tv_grads = convert_torchvision_detection({k: p.grad for k, p in ref.named_parameters() if p.grad is not None})
    our_grads = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    assert set(tv_grads) == set(our_grads) and len(our_grads) > 60
    errors = {k: float((g - tv_grads[k]).abs().max() / tv_grads[k].abs().max()) for k, g in our_grads.items()}
    assert all(tv_grads[k].abs().max() > 0 for k in our_grads)
    return expected, got, errors


def test_losses_and_gradients_equal_torchvision() -> None:
    ref, ours, images, targets = _models_and_batch()
    assert len(_folding_convs(ours)) == 53  # every trunk convolution carries a frozen BN (as torchvision's trunk)
    assert not any(isinstance(m, TorchvisionFrozenBN) for m in ours.modules())
    expected, got, errors = _losses_and_grads(ref, ours, images, targets, fold=False)
    assert ours.training and not any(conv.training for conv in _folding_convs(ours))
    assert set(got) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        assert expected[name] > 0
        # measured: 8.7e-8 relative at most over the four losses
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    # 1e-4 of the largest entry (measured: 1.0e-6 at most); a wrong mapping or formula gives O(1) differences.
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"gradient of {worst}: {errors[worst]:.2e} of its largest entry"


def test_training_time_bn_fold_is_exact_arithmetic_and_only_changes_float32_rounding() -> None:
    ref, ours, images, targets = _models_and_batch()
    # 1. The fold is exact: in float64, backbone + FPN gradients with the fold (training mode) and without it
    #    (conv then BN) agree to rounding (measured 2.6e-15 of the largest entry).
    net = ours.backbone.double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 128, 160, generator=g, dtype=torch.float64)
    projection: dict[str, torch.Tensor] = {}

    def grads() -> dict[str, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        feats = net(x)
        for k, v in feats.items():
            projection.setdefault(k, torch.randn(v.shape, generator=g, dtype=torch.float64))
        sum((v * projection[k]).sum() for k, v in feats.items()).backward()
        return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    folded = grads()
    for conv in _folding_convs(net):
        conv.eval()
    plain = grads()
    worst = max(float((folded[k] - plain[k]).abs().max() / plain[k].abs().max()) for k in plain)
    assert worst <= 1e-10, f"the fold is not exact arithmetic: {worst:.1e}"

    # 2. In float32 the whole detector with the fold (what training runs) against torchvision: the losses agree
    #    to 1e-5, and the gradients to 9.8e-4 of the largest entry on this seed (3e-3 and 7e-3 on two variants of
    #    it, measured while writing this test): the fold rounds differently (~1e-7 relative), and on this random-
    #    weight ResNet-50 a rounding difference flips discrete choices, the sign of a few pre-activations sitting
    #    at a ReLU's edge (~0.1% of the entries of some res5 weight gradients) and the order of near-tied
    #    objectness scores in the RPN's top-k and NMS (another set of proposals reaches the box head). Neither
    #    order is the "right" one: against float64 the fold's backbone gradients are within 5.5e-4 of the largest
    #    entry, torchvision's order within 4.4e-2. Hence the bound of 1e-2 here (a wrong mapping or formula still
    #    gives O(1)); the 1e-4 parity is the test above, and part 1 proves the fold itself changes nothing.
    ours.float().zero_grad(set_to_none=True)
    expected, got, errors = _losses_and_grads(ref, ours, images, targets, fold=True)
    assert all(conv.training for conv in _folding_convs(ours))
    for name in LOSS_NAMES:
        # measured: 1.7e-7 relative at most on this seed (rtol 1e-5: the fold's rounding can move a proposal, see above)
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    worst_key = max(errors, key=errors.get)
    # Measured on this seed: 9.8e-4 (worst), 1.3e-4 (median); the 1e-2 bound is the figure of the variants.
    assert errors[worst_key] <= 1e-2, f"gradient of {worst_key}: {errors[worst_key]:.2e} of its largest entry"
    median = sorted(errors.values())[len(errors) // 2]
    assert median <= 1e-3, f"the median parameter's error is {median:.1e} (measured 1.3e-4)"


def test_bn_folded_backbone_gradients_equal_torchvision_in_float64() -> None:
    """The fold in float32, as training runs it, against the exact answer: torchvision's backbone + FPN (conv,
    then its own FrozenBatchNorm2d) in float64, on a random projection of the five FPN outputs.

    Why a bound of 1e-5 holds here and not on the whole detector: one image of 64x96 px has few pre-activations
    within float32 rounding of a ReLU's edge, and no top-k / NMS / matching follows. Measured, worst parameter
    relative to its largest entry, seeds 1-6: ours (fold, float32) 1.1e-6 to 1.35e-6 (1.2e-6 on seed 1, the
    one used); torchvision's float32 order 1.15e-6 to 1.5e-6, except seed 4 where one of its pre-activations
    lands on the other side of a ReLU and 11 parameters are off by up to 2.2e-2. At 2x128x160 px such flips
    came on 2 of 4 seeds (either library), the reason why the whole-detector test above bounds at 1e-2.
    """
    ref, ours, _, _ = _models_and_batch()
    ref.train()
    ours.train()
    assert len(_folding_convs(ours)) == 53 and all(conv.training for conv in _folding_convs(ours))  # the fold is on
    exact = copy.deepcopy(ref.backbone).double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 64, 96, generator=g)
    got = ours.backbone(x)
    want = exact(x.double())
    assert list(got) == ["p2", "p3", "p4", "p5", "p6"] and list(want) == ["0", "1", "2", "3", "pool"]
    projection = [torch.randn(v.shape, generator=g, dtype=torch.float64) for v in want.values()]
    for name, a, b in zip(got, got.values(), want.values()):  # the features first (measured: 1.3e-6 at most)
        err = float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())
        assert err <= 1e-5, f"feature {name}: {err:.2e} of its largest entry"
    sum((v * w.float()).sum() for v, w in zip(got.values(), projection)).backward()
    sum((v * w).sum() for v, w in zip(want.values(), projection)).backward()
    reference = convert_torchvision_detection(
        {f"backbone.{k}": p.grad for k, p in exact.named_parameters() if p.grad is not None})
    grads = {f"backbone.{k}": p.grad for k, p in ours.backbone.named_parameters() if p.grad is not None}
    assert set(grads) == set(reference) and len(grads) == 69  # every trunk and FPN parameter
    errors = {k: float((grads[k].double() - reference[k]).abs().max() / reference[k].abs().max()) for k in grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, f"gradient of {worst}: {errors[worst]:.2e} of its largest entry (measured 1.2e-6)"

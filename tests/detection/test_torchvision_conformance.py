"""Our torchvision-named detectors behave as torchvision's where a torchvision user's code looks: the loss
names, images without boxes, differentiable eval outputs, float64 models, images of any size, the
builders' keyword arguments, TorchScript (`torch.jit.script(model)`, saved and loaded), and the box coder /
matcher / sampler those rest on.

References are computed live from torchvision (its builders on the meta device where only the structure
matters, its own BoxCoder and Matcher); models are narrow (width 8) and images small, on one thread.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision
from parity_helpers import load_images, match_detections, perturb, perturb_frozen_bn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection import _utils as tv_utils

import detection
import segmentation
from backbone import FPN, TorchvisionBackbone, build_backbone
from backbone.weights import WeightsError, save_safetensors
from detection.boxes import BoxCoder
from detection.faster_rcnn import FasterRCNN as OurFasterRCNN
from detection.matcher import IGNORE, Matcher, sample_balanced
from detection.structures import GroundTruth

pytestmark = pytest.mark.usefixtures("single_thread")

BUILDERS = {
    "fasterrcnn_resnet50_fpn": detection.fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": detection.fasterrcnn_resnet50_fpn_v2,
    "maskrcnn_resnet50_fpn": segmentation.maskrcnn_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": segmentation.maskrcnn_resnet50_fpn_v2,
}
NAMES = list(BUILDERS)
# Narrow parts (our spec settings) under torchvision's own keywords (min_size / max_size, num_classes).
NARROW = {"backbone_width": 8, "fpn_channels": 16, "fc_dim": 32, "roi_conv_dim": 16}
NARROW_MASK = {**NARROW, "mask_conv_dim": 16}


def narrow(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    parts = NARROW_MASK if name.startswith("mask") else NARROW
    return BUILDERS[name](**{"num_classes": 3, "min_size": 64, "max_size": 96, **parts, **kwargs})


def empty_target(h: int, w: int, masks: bool) -> dict[str, torch.Tensor]:
    """An image without objects, as torchvision's negative-sample tests give it."""
    t = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}
    if masks:
        t["masks"] = torch.zeros((0, h, w), dtype=torch.uint8)
    return t


def one_box_target(h: int, w: int, masks: bool, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    x1, y1, x2, y2 = w * 0.2, h * 0.25, w * 0.7, h * 0.8
    t = {"boxes": torch.tensor([[x1, y1, x2, y2]], dtype=dtype), "labels": torch.tensor([1])}
    if masks:
        m = torch.zeros((1, h, w), dtype=torch.uint8)
        m[0, math.floor(y1):math.ceil(y2), math.floor(x1):math.ceil(x2)] = 1
        t["masks"] = m
    return t


@pytest.fixture(scope="module")
def torchvision_loss_names() -> dict[str, set[str]]:
    """The loss names torchvision's own FasterRCNN and MaskRCNN classes return (one training step on a narrow
    FPN of ours, random weights: the names do not depend on the backbone)."""
    names = {}
    torch.manual_seed(0)
    for family, cls in (("fasterrcnn_resnet50_fpn", FasterRCNN), ("maskrcnn_resnet50_fpn", MaskRCNN)):
        fpn = FPN(build_backbone("resnet18", width=8, out_features=("res2", "res3", "res4", "res5")), out_channels=16)
        tv = cls(TorchvisionBackbone(fpn), num_classes=3, min_size=64, max_size=64)
        names[family] = set(tv([torch.rand(3, 64, 64)], [one_box_target(64, 64, family.startswith("mask"))]))
    return names


# ------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("name", NAMES)
def test_loss_names_are_torchvision_s(name: str, torchvision_loss_names: dict[str, set[str]]) -> None:
    model = narrow(name).train()
    losses = model([torch.rand(3, 64, 80)], [one_box_target(64, 80, name.startswith("mask"))])
    family = "maskrcnn_resnet50_fpn" if name.startswith("mask") else "fasterrcnn_resnet50_fpn"
    assert set(losses) == torchvision_loss_names[family]


@pytest.mark.parametrize("name", NAMES)
def test_an_image_without_boxes_has_zero_box_losses_and_finite_gradients(name: str) -> None:
    masks = name.startswith("mask")
    model = narrow(name, min_size=100, max_size=100).train()
    losses = model([torch.rand(3, 100, 100)], [empty_target(100, 100, masks)])
    zero = ["loss_box_reg", "loss_rpn_box_reg", *(["loss_mask"] if masks else [])]
    for key in zero:  # exactly 0, a float32 scalar: what torchvision's negative-sample tests compare with
        torch.testing.assert_close(losses[key], torch.tensor(0.0), rtol=0, atol=0)  # measured: 0; atol=0: exact zeros
    for key in ("loss_objectness", "loss_classifier"):  # the background is still learnt
        assert torch.isfinite(losses[key]) and losses[key] > 0, (key, losses[key])
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn"])
def test_a_batch_mixing_empty_and_annotated_images_trains(name: str) -> None:
    masks = name.startswith("mask")
    model = narrow(name).train()
    losses = model([torch.rand(3, 60, 90), torch.rand(3, 80, 64)],
                   [empty_target(60, 90, masks), one_box_target(80, 64, masks)])
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert losses["loss_rpn_box_reg"] > 0 and losses["loss_box_reg"] > 0  # the annotated image counts
    sum(losses.values()).backward()


def test_matching_an_image_without_boxes_labels_every_anchor_and_proposal_background() -> None:
    """torchvision's `assign_targets_to_anchors` / `assign_targets_to_proposals` on an empty image: all
    background, matched index 0. Ours: the RPN's shared matching and the RoI heads' sampling."""
    gt = GroundTruth.from_targets([empty_target(100, 100, False)], torch.device("cpu"))
    anchors = torch.randint(-50, 50, (3, 4)).float()
    matched, labels = Matcher(0.7, 0.3, allow_low_quality_matches=True).match_shared(gt.boxes, gt.image_index,
                                                                                      anchors, 1)
    assert matched.shape == labels.shape == (1, 3) and not matched.any() and not labels.any()
    heads = narrow("fasterrcnn_resnet50_fpn").roi_heads
    proposals = torch.rand(1, 20, 4) * 50
    proposals[..., 2:] += proposals[..., :2] + 1
    sampled = heads.sample(proposals, torch.ones(1, 20, dtype=torch.bool), gt)
    assert sampled["valid"].all() and not sampled["fg"].any() and not sampled["labels"].any()


# ------------------------------------------------------------------------------------ eval outputs
@pytest.mark.parametrize("name", NAMES)
def test_eval_outputs_are_differentiable_with_gradients_enabled(name: str) -> None:
    """torchvision's `_check_input_backprop`: in eval, with gradients enabled, `scores.sum().backward()`
    reaches the input image. Under `no_grad` / `inference_mode` nothing is recorded and the detections
    are the same."""
    model = narrow(name, box_score_thresh=0.0).eval()
    x = torch.rand(3, 70, 90)
    model_input = [x.requires_grad_(True)]
    out = model(model_input)
    assert model_input[0] is x and len(out) == 1
    float_keys = ["boxes", "scores", *(["masks"] if name.startswith("mask") else [])]
    assert len(out[0]["scores"]) > 0
    assert all(out[0][k].grad_fn is not None for k in float_keys), {k: out[0][k].grad_fn for k in float_keys}
    assert out[0]["labels"].dtype == torch.int64
    out[0]["scores"].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            again = model([x.detach()])[0]
        assert all(again[k].grad_fn is None and not again[k].requires_grad for k in float_keys)
        for k in out[0]:
            # measured: 0; atol=0: exact (the same eval pass twice)
            torch.testing.assert_close(again[k], out[0][k].detach(), rtol=0, atol=0, msg=f"{mode.__name__}: {k}")


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_float64_model_trains_and_predicts_in_float64(name: str) -> None:
    """`model.double()` as torchvision's `test_fasterrcnn_double`: float64 losses and outputs, and the same
    detections as the float32 model (measured: boxes within 5e-5 px, scores within 2e-6)."""
    masks = name.startswith("mask")
    model32 = narrow(name, box_detections_per_img=1000).eval()
    model = copy.deepcopy(model32).double()
    images = [torch.rand(3, 64, 96, dtype=torch.float64), torch.rand(3, 90, 70, dtype=torch.float64)]
    with torch.no_grad():
        out = model(images)
        ref = model32([im.float() for im in images])
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o["boxes"].dtype == o["scores"].dtype == torch.float64
        if masks:
            assert o["masks"].dtype == torch.float64 and o["masks"].shape[-2:] == images[i].shape[-2:]
        assert len(r["boxes"]) > 0
        match_detections(r, {k: v.float() for k, v in o.items() if k != "masks"}, f"image {i}")
    targets = [one_box_target(64, 96, masks, torch.float64), empty_target(90, 70, masks)]
    losses = model.train()(images, targets)
    assert all(v.dtype == torch.float64 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(p.grad.dtype == torch.float64 for p in model.parameters() if p.grad is not None)


SIZES = [(1, 1), (5, 300), (300, 5), (33, 97), (480, 640)]


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn"])
def test_images_of_any_size_train_and_predict_in_their_own_pixels(name: str) -> None:
    masks = name.startswith("mask")
    model = narrow(name, box_score_thresh=0.0, box_detections_per_img=20)
    images = [torch.rand(3, h, w) for h, w in SIZES]
    targets = [one_box_target(h, w, masks) if h > 1 else empty_target(h, w, masks) for h, w in SIZES]
    losses = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    with torch.no_grad():
        out = model.eval()(images)
    assert len(out) == len(SIZES)
    for (h, w), o in zip(SIZES, out):
        assert len(o["boxes"]) > 0, (h, w)
        assert (o["boxes"] >= 0).all() and (o["boxes"][:, 0::2] <= w).all() and (o["boxes"][:, 1::2] <= h).all()
        if masks:
            assert o["masks"].shape == (len(o["boxes"]), 1, h, w)


def test_targets_are_not_modified_by_a_resizing_model() -> None:
    """torchvision's `test_transform_copy_targets`: the caller's boxes stay in the caller's pixels."""
    model = narrow("fasterrcnn_resnet50_fpn").train()
    targets = [one_box_target(200, 300, False), one_box_target(200, 200, False)]
    before = copy.deepcopy(targets)
    model([torch.rand(3, 200, 300), torch.rand(3, 200, 200)], targets)
    for t, b in zip(targets, before):
        assert all(torch.equal(t[k], b[k]) for k in b)


def test_bad_inputs_raise_value_errors_where_torchvision_asserts() -> None:
    """An intended difference: torchvision raises AssertionError (TypeError for uint8 images), ours a ValueError
    that names the field and the fix."""
    model = narrow("fasterrcnn_resnet50_fpn").train()
    x = [torch.rand(3, 64, 64)]
    cases = [
        (None, r"targets must be given in training mode"),
        ([{"boxes": 0.0}], r"targets\[0\]\['boxes'\] is a float, expected a tensor"),
        ([{"boxes": torch.rand(4)}], r"targets\[0\]\['boxes'\] has shape \(4,\), expected \[K, 4\]"),
        ([{"boxes": torch.rand(1, 5)}], r"targets\[0\]\['boxes'\] has shape \(1, 5\), expected \[K, 4\]"),
        ([{"boxes": torch.tensor([[1.0, 3, 1, 4]]), "labels": torch.tensor([1])}], r"degenerate"),
    ]
    for targets, message in cases:
        with pytest.raises(ValueError, match=message):
            model(x, targets)
    with pytest.raises(ValueError, match=r"dtype torch.uint8; expected float values in \[0, 1\]"):
        model.eval()([torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)])


# ----------------------------------------------------------------------------------------- builders
def test_builders_take_torchvision_keyword_arguments_with_torchvision_meaning() -> None:
    kwargs = {"min_size": 100, "max_size": 150, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.2, 0.2, 0.2],
              "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_train": 500, "rpn_nms_thresh": 0.6,
              "rpn_fg_iou_thresh": 0.6, "rpn_bg_iou_thresh": 0.2, "rpn_batch_size_per_image": 128,
              "box_score_thresh": 0.2, "box_nms_thresh": 0.4, "box_detections_per_img": 50,
              "box_fg_iou_thresh": 0.6, "box_bg_iou_thresh": 0.4, "box_batch_size_per_image": 64,
              "box_positive_fraction": 0.5, "bbox_reg_weights": (5.0, 5.0, 2.0, 2.0)}
    with torch.device("meta"):
        tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                  num_classes=5, **kwargs)
    ours = detection.fasterrcnn_resnet50_fpn(num_classes=5, **NARROW, **kwargs)
    p, rpn, heads = ours.preprocessor, ours.rpn, ours.roi_heads
    assert p.min_size == tuple(tv.transform.min_size) and p.test_min_size == tv.transform.min_size[-1]
    assert p.max_size == p.test_max_size == tv.transform.max_size
    assert p.pixel_mean.flatten().tolist() == tv.transform.image_mean
    # measured: 3.0e-9 (float32 std vs torchvision's Python floats); approx's default rel 1e-6
    assert p.pixel_std.flatten().tolist() == pytest.approx(tv.transform.image_std)
    assert rpn.pre_nms_topk == (tv.rpn._pre_nms_top_n["training"], tv.rpn._pre_nms_top_n["testing"])
    assert rpn.post_nms_topk == (tv.rpn._post_nms_top_n["training"], tv.rpn._post_nms_top_n["testing"])
    assert rpn.nms_thresh == tv.rpn.nms_thresh and rpn.batch_size_per_image == tv.rpn.fg_bg_sampler.batch_size_per_image
    assert (rpn.matcher.high, rpn.matcher.low) == (tv.rpn.proposal_matcher.high_threshold,
                                                   tv.rpn.proposal_matcher.low_threshold)
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (
        tv.roi_heads.score_thresh, tv.roi_heads.nms_thresh, tv.roi_heads.detections_per_img)
    assert (heads.matcher.high, heads.matcher.low) == (tv.roi_heads.proposal_matcher.high_threshold,
                                                       tv.roi_heads.proposal_matcher.low_threshold)
    assert (heads.batch_size_per_image, heads.positive_fraction) == (
        tv.roi_heads.fg_bg_sampler.batch_size_per_image, tv.roi_heads.fg_bg_sampler.positive_fraction)
    assert heads.box_coder.weights == tv.roi_heads.box_coder.weights
    # Our spelling of the test size wins over torchvision's shared one; bbox_reg_weights=None is the default.
    ours = detection.fasterrcnn_resnet50_fpn(num_classes=5, min_size=100, test_min_size=300, bbox_reg_weights=None,
                                             **NARROW)
    assert ours.preprocessor.min_size == (100,) and ours.preprocessor.test_min_size == 300
    assert ours.roi_heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    with pytest.raises(ValueError, match=r"box_predictor: torchvision's module arguments are not taken here"):
        detection.fasterrcnn_resnet50_fpn(num_classes=5, box_predictor=torch.nn.Identity())
    with pytest.raises(ValueError, match=r"unknown setting 'box_score_threshold'"):
        detection.fasterrcnn_resnet50_fpn(num_classes=5, box_score_threshold=0.2)


def _torchvision_trainable_counts(name: str) -> list[int]:
    """Trainable parameter tensors of torchvision's own builder for trainable_backbone_layers 0..5, with
    backbone weights (their loading mocked out, as torchvision's test does; meta device: structure only)."""
    counts = []
    for k in range(6):
        with torch.device("meta"), mock.patch("torchvision.models._api.WeightsEnum.get_state_dict", return_value={}), \
                mock.patch("torch.nn.Module.load_state_dict"):
            tv = getattr(torchvision.models.detection, name)(weights=None, weights_backbone="DEFAULT",
                                                              trainable_backbone_layers=k)
        counts.append(sum(p.requires_grad for p in tv.parameters()))
    return counts


@pytest.mark.parametrize("name", NAMES)
def test_trainable_backbone_layers_freeze_what_torchvision_freezes(name: str, tmp_path: Path) -> None:
    torch.manual_seed(123)  # another initialisation than the detector's
    trunk = build_backbone("resnet50", width=8, norm="BN" if name.endswith("_v2") else "FrozenBN")
    trunk_file = save_safetensors(trunk, tmp_path / "trunk.safetensors")
    ours = []
    for k in range(6):
        model = narrow(name, weights_backbone=trunk_file, trainable_backbone_layers=k)
        ours.append(sum(p.requires_grad for p in model.parameters()))
    assert ours == _torchvision_trainable_counts(name)
    loaded = model.backbone.bottom_up.state_dict()  # the file's weights, not the detector's initialisation
    assert all(torch.equal(loaded[k], v) for k, v in trunk.state_dict().items() if v.is_floating_point())


def test_trainable_backbone_layers_without_weights_and_bad_values() -> None:
    """torchvision's rule: without weights every stage stays trainable, with a warning when asked otherwise."""
    everything = sum(p.requires_grad for p in narrow("fasterrcnn_resnet50_fpn").parameters())
    with pytest.warns(UserWarning, match=r"trainable_backbone_layers=2 has no effect without weights"):
        model = narrow("fasterrcnn_resnet50_fpn", trainable_backbone_layers=2)
    assert sum(p.requires_grad for p in model.parameters()) == everything
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        narrow("fasterrcnn_resnet50_fpn")  # nothing asked, nothing to warn about
    for bad in (6, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"trainable_backbone_layers=.*give an int from 0"):
            narrow("fasterrcnn_resnet50_fpn", trainable_backbone_layers=bad, weights_backbone="imagenet")
    with pytest.raises(ValueError, match=r"not both"):
        narrow("fasterrcnn_resnet50_fpn", trainable_backbone_layers=3, backbone_freeze_at=1)


def test_weights_backbone_by_torchvision_name_offline_names_the_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    entry = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    with pytest.raises(WeightsError, match=entry.url.rsplit("/", 1)[1]):
        detection.fasterrcnn_resnet50_fpn(weights_backbone="IMAGENET1K_V1")
    with pytest.raises(ValueError, match=r"is not a weight of torchvision's resnet50"):
        detection.fasterrcnn_resnet50_fpn(weights_backbone="COCO_V1")


# --------------------------------------------------------------------------------- detection utils
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_is_torchvision_s(weights: tuple[float, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(50, 4, generator=g) * 100
    ref[:, 2:] += ref[:, :2] + 10  # no side ratio beyond the coder's exp clip (1000 / 16), so the round trip is exact
    gt = torch.rand(50, 4, generator=g) * 100
    gt[:, 2:] += gt[:, :2] + 1
    ours, tv = BoxCoder(weights), tv_utils.BoxCoder(weights)
    # measured: 0; atol=0: exact, the same arithmetic as torchvision
    torch.testing.assert_close(ours.encode(ref, gt), tv.encode_single(gt, ref), rtol=0, atol=0)
    deltas = torch.randn(50, 8, generator=g)
    # measured: 0; atol=0: exact, the same arithmetic as torchvision
    torch.testing.assert_close(ours.decode(deltas, ref).view(50, 2, 4), tv.decode_single(deltas, ref).view(50, 2, 4),
                               rtol=0, atol=0)
    # Round trip, and float64 stays float64.
    # measured: 1.5e-5 px at most (encode then decode in float32), 0.08 of atol 2e-4
    torch.testing.assert_close(ours.decode(ours.encode(ref, gt), ref), gt, rtol=0, atol=2e-4)
    assert ours.decode(deltas.double(), ref.double()).dtype == torch.float64


@pytest.mark.parametrize("high, low, low_quality", [(0.7, 0.3, True), (0.5, 0.5, False)])
def test_matcher_labels_as_torchvision_s(high: float, low: float, low_quality: bool) -> None:
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(6, 4, generator=g) * 60
    gt[:, 2:] += gt[:, :2] + 10
    preds = torch.rand(300, 4, generator=g) * 80
    preds[:, 2:] += preds[:, :2] + 5
    tv = tv_utils.Matcher(high, low, allow_low_quality_matches=low_quality)(torchvision.ops.box_iou(gt, preds))
    expected = torch.where(tv >= 0, 1, torch.where(tv == tv_utils.Matcher.BELOW_LOW_THRESHOLD, 0, IGNORE))
    matched, labels = Matcher(high, low, allow_low_quality_matches=low_quality).match_per_image(
        gt, torch.zeros(6, dtype=torch.int64), preds, torch.zeros(300, dtype=torch.int64))
    assert torch.equal(labels.long(), expected)
    assert torch.equal(matched[labels == 1], tv[tv >= 0])
    assert (labels == 1).any() and (labels == 0).any()


def test_balanced_sampler_on_torchvision_s_example() -> None:
    """torchvision's `test_balanced_positive_negative_sampler` case: 6 negatives, 3 positives, 2 ignored;
    a sample of 4 with a quarter positive takes 1 positive and 3 negatives, never an ignored entry."""
    labels = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, -1, -1]])
    for seed in range(20):
        index, valid = sample_balanced(labels, 4, 0.25, generator=torch.Generator().manual_seed(seed))
        picked = index[valid]
        assert valid.all() and len(picked) == 4 and len(set(picked.tolist())) == 4
        assert ((picked >= 6) & (picked < 9)).sum() == 1 and (picked < 6).sum() == 3


# -------------------------------------------------------------------------------------------- TorchScript
def _script(model: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated (torch 2.14)
        return torch.jit.script(model)


def _scripted_detections(module: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "RCNN always returns a", UserWarning)  # torchvision's reminder
        losses, detections = module(images)
    assert losses == {}
    return detections


def _unpadded_batches(folder: Path) -> list[list[torch.Tensor]]:
    """Real images in batches that need no padding: 480 x 640 resized to 192 x 256 (two in a batch), and
    640 x 480 to 256 x 192 (a batch of its own), multiples of the padding multiple 32.

    Padding is a constant region, whose anchors and RoIs a random-weight model scores exactly alike. Where equal
    scores meet a top-k cut or an NMS decision, our eager code and torchvision's scripted logic may keep a
    different one of the tied candidates (both valid): measured on the padded batch of the first two images,
    a tenth of the RPN's proposals and then the detections of the second image differed. These batches have
    no ties to break."""
    images = load_images(folder)
    landscape = [im for im in images if tuple(im.shape[1:]) == (480, 640)][:2]
    portrait = [im for im in images if tuple(im.shape[1:]) == (640, 480)][:1]
    assert len(landscape) == 2 and len(portrait) == 1
    return [landscape, portrait]


UNPADDED = {"min_size": 192, "max_size": 256}


def _c4(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return detection.build_faster_rcnn(num_classes=2, arch="c4", backbone_name="resnet18", backbone_width=8,
                                       input_min_size=(192,), input_max_size=256, input_test_min_size=192,
                                       input_test_max_size=256, **kwargs)


def _ties_in_one_order(det: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`det` sorted by decreasing score, then by box: detections of exactly equal score (a random-weight C4 model
    gives some) in one order, whichever the implementation listed first."""
    rows = sorted(range(len(det["scores"])), key=lambda j: (-float(det["scores"][j]), *det["boxes"][j].tolist()))
    return {k: v[rows] for k, v in det.items()}


def assert_same_detections(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w) and len(w["boxes"]) > 0, (i, set(g), len(w["boxes"]))
        g, w = _ties_in_one_order(g), _ties_in_one_order(w)
        for k in ("boxes", "scores", "labels"):  # measured: equal (the same kernels on the same values)
            torch.testing.assert_close(g[k], w[k], rtol=0, atol=0, msg=f"image {i}: {k}")
        if "masks" in w:  # measured: 1.2e-7 (torchvision pastes each mask with interpolate, ours as two products)
            torch.testing.assert_close(g["masks"], w["masks"], rtol=0, atol=1e-6, msg=f"image {i}: masks")


@pytest.mark.parametrize("name", [*NAMES, "c4"])
def test_torchscript_gives_the_eager_detections_and_saves_and_loads(name: str, tiny_coco_src: Path,
                                                                     tmp_path: Path) -> None:
    """torchvision's `_check_jit_scriptable`: `torch.jit.script(model)`, eval outputs equal to eager, and a
    save / load round trip; on real images, random BN statistics and biases (every shared module matters)."""
    model = (_c4() if name == "c4" else narrow(name, **UNPADDED)).eval()
    perturb(model)
    perturb_frozen_bn(model)
    scripted = _script(model)
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    for images in _unpadded_batches(tiny_coco_src):
        with torch.no_grad():
            want = model(images)
        assert_same_detections(_scripted_detections(scripted, images), want)
        assert_same_detections(_scripted_detections(loaded, images), want)


def test_the_scripted_module_shares_the_parameters_and_is_for_inference(tiny_coco_src: Path) -> None:
    model = narrow("maskrcnn_resnet50_fpn", **UNPADDED).eval()
    scripted = _script(model)
    # The same tensors, not copies: every parameter of ours, nothing else.
    assert {p.data_ptr() for p in scripted.parameters()} == {p.data_ptr() for p in model.parameters()}
    images = _unpadded_batches(tiny_coco_src)[0]
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.bias[1] += 5.0  # a change to ours is the scripted module's
        want = model(images)
    assert (want[0]["labels"] == 1).all()
    assert_same_detections(_scripted_detections(scripted, images), want)
    scripted.train()
    with pytest.raises(torch.jit.Error, match=r"the TorchScript module of MaskRCNN is for inference: call \.eval\(\)"):
        scripted(images, [one_box_target(480, 640, True), one_box_target(480, 640, True)])
    # A model prepared for inference (frozen BN folded into the convolutions, channels-last) scripts as prepared.
    prepared = narrow("fasterrcnn_resnet50_fpn", **UNPADDED).eval()
    perturb_frozen_bn(prepared)
    prepared.prepare_for_inference()
    with torch.no_grad():
        want = prepared(images)
    assert_same_detections(_scripted_detections(_script(prepared), images), want)


class _OwnForward(OurFasterRCNN):
    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        return super().forward(images, targets)


def _with(model: torch.nn.Module, **attributes: object) -> torch.nn.Module:
    for dotted, value in attributes.items():
        *path, attr = dotted.split("__")
        setattr(model.get_submodule(".".join(path)), attr, value)
    return model


@pytest.mark.parametrize("make, message", [
    (lambda: narrow("fasterrcnn_resnet50_fpn", roi_pooler_type="roi_align_v2"),
     r"roi\.pooler_type='roi_align_v2' has no TorchScript equivalent: torchvision's MultiScaleRoIAlign"),
    (lambda: narrow("maskrcnn_resnet50_fpn", torchvision_anchor_strides=False),
     r"anchor strides \[4, 8, 16, 32, 64\] with torchvision_anchor_strides=False.*\[64\]"),
    (lambda: _with(narrow("fasterrcnn_resnet50_fpn"), preprocessor__fixed_size=(128, 128)),
     r"preprocessor\.fixed_size=\(128, 128\) \(static shapes\) has no TorchScript equivalent"),
    (lambda: _with(narrow("fasterrcnn_resnet50_fpn"), preprocessor__test_min_size=None),
     r"test_min_size=None \(no resizing at inference\).*torchvision's transform always resizes"),
    (lambda: _with(narrow("fasterrcnn_resnet50_fpn"), roi_heads__min_box_size=1.0),
     r"roi_heads\.min_box_size=1\.0: torchvision's post-processing drops boxes below 0\.01 px"),
    (lambda: segmentation.build_panoptic_fpn(num_classes=3, backbone_width=8, with_masks=True),
     r"torch\.jit\.script\(PanopticFPN\): its image heads \[.semantic_head.\]"),
    (lambda: _OwnForward(*narrow("fasterrcnn_resnet50_fpn").children()),
     r"_OwnForward overrides FasterRCNN\.forward"),
    (lambda: segmentation.build_semantic_fpn(num_classes=3, backbone_width=8),
     r"torch\.jit\.script\(SemanticFPN\): not supported"),
])
def test_settings_without_a_torchscript_equivalent_raise_value_errors(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _script(make().eval())

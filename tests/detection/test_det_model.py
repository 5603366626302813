"""The whole detector on cheap models: batching, input checking, empty ground truth, a seeded loss
regression, mixed precision on CPU, C4 trunks, inference preparation and a torchvision backbone inside
our Faster R-CNN."""

from __future__ import annotations

import pytest
import torch
from parity_helpers import perturb_frozen_bn
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from backbone import FrozenBatchNorm2d, ShapeSpec, from_torchvision
from detection.faster_rcnn import FasterRCNN
from detection.models import build_faster_rcnn

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 4  # background + 3: what the model predicts (the spec counts the 3 foreground classes)

TINY = dict(backbone_name="resnet18", backbone_width=8, num_classes=NUM_CLASSES - 1, backbone_norm="BN", freeze_at=0,
            fpn_channels=32, fc_dim=64, min_size=(128,), max_size=160, test_min_size=128, test_max_size=160,
            rpn_batch_size_per_image=64, roi_batch_size_per_image=64, rpn_pre_nms_topk=(600, 300),
            rpn_post_nms_topk=(300, 150))


def tiny_model(**overrides) -> FasterRCNN:
    return build_faster_rcnn(**{**TINY, **overrides})


def images_and_targets(seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of different sizes (both get resized) with 2 and 1 boxes."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 100, 120, generator=g), torch.rand(3, 140, 110, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 30.0, 115.0, 95.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[5.0, 40.0, 90.0, 130.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def assert_same_detections(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: str, *,
                           score_tol: float = 1e-4, box_tol: float = 1e-3) -> None:
    """The same set of detections (order may differ among equal scores)."""
    assert len(ref["boxes"]) == len(got["boxes"]), f"{where}: {len(ref['boxes'])} vs {len(got['boxes'])} detections"
    unused = torch.ones(len(got["boxes"]), dtype=torch.bool)
    for box, score, label in zip(ref["boxes"], ref["scores"], ref["labels"]):
        close = ((got["scores"] - score).abs() <= score_tol) & (got["labels"] == label) & unused
        close &= (got["boxes"] - box).abs().max(dim=1).values <= box_tol
        idx = close.nonzero()
        assert len(idx), f"{where}: no match for label {int(label)} score {float(score):.6f} box {box.tolist()}"
        unused[idx[0, 0]] = False


def train_step(model: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], *,
               autocast: bool = False) -> dict[str, torch.Tensor]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = model(images, targets)
    total = sum(losses.values())
    opt.zero_grad()
    total.backward()
    opt.step()
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    for k, v in losses.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v), f"{k} = {v}"
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert changed >= len(params) // 2, f"only {changed} of {len(params)} parameter tensors were updated"
    return losses


# ------------------------------------------------------------------------------------ batched == alone
def test_batched_equals_per_image() -> None:
    """A batch of 3 different-size images gives each image the detections it gets alone.

    The sizes are chosen so that each image, resized (shorter side 128, longer <= 160) and padded to a
    multiple of 32, lands in the same 128 x 160 padded canvas as the batch: per-image sizes, clipping,
    proposal selection, NMS groups and the mapping back to input pixels all differ between the images,
    while the pixels the network sees do not. (With different padded sizes the border padding changes
    the features, in torchvision as here, and no detector gives identical outputs.)
    """
    torch.manual_seed(0)
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(1)
    sizes = [(96, 110), (128, 150), (64, 80)]  # -> 128x146, 128x150, 128x160
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    with torch.no_grad():
        batched = model(images)
        alone = [model([img])[0] for img in images]
    for i, (b, a, (h, w)) in enumerate(zip(batched, alone, sizes)):
        assert len(a["boxes"]) >= 20, "a random model should give many detections"
        # In the image's own pixel coordinates.
        assert (a["boxes"][:, 2] <= w + 1e-3).all() and (a["boxes"][:, 3] <= h + 1e-3).all()
        assert (a["boxes"][:, 2] > w * 0.9).any() or (a["boxes"][:, 3] > h * 0.9).any()
        assert_same_detections(a, b, f"image {i}")
    # The images really get different detections (no accidental sharing across the batch).
    assert not torch.equal(batched[0]["scores"][:5], batched[1]["scores"][:5])


# --------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def checker() -> FasterRCNN:
    return tiny_model().train()


def good() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    return [torch.rand(3, 64, 80), torch.rand(3, 72, 64)], [
        {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[4.0, 5.0, 20.0, 30.0], [10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([2, 3])},
    ]


def test_images_not_a_list(checker: FasterRCNN) -> None:
    with pytest.raises(ValueError, match=r"images must be a list of \[3, H, W\] float tensors, got dict"):
        checker({"a": torch.rand(3, 64, 64)})


def test_images_as_4d_tensor(checker: FasterRCNN) -> None:
    with pytest.raises(ValueError, match=r"got Tensor; for a batched \(N, 3, H, W\) tensor pass list\(batch\)"):
        checker(torch.rand(2, 3, 64, 64))
    images, targets = good()
    images[1] = images[1][None]
    with pytest.raises(ValueError, match=r"images\[1\] has shape \(1, 3, 72, 64\), expected \[3, H, W\]"):
        checker(images, targets)


def test_images_wrong_channels(checker: FasterRCNN) -> None:
    images, targets = good()
    images[1] = torch.rand(1, 72, 64)
    with pytest.raises(ValueError, match=r"images\[1\] has shape \(1, 72, 64\)"):
        checker(images, targets)


def test_images_uint8(checker: FasterRCNN) -> None:
    images, targets = good()
    images[0] = (images[0] * 255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"images\[0\] has dtype torch.uint8.*img.float\(\) / 255"):
        checker(images, targets)


def test_missing_targets_in_training(checker: FasterRCNN) -> None:
    images, _ = good()
    with pytest.raises(ValueError, match="targets must be given in training mode"):
        checker(images)


def test_wrong_number_of_targets(checker: FasterRCNN) -> None:
    images, targets = good()
    with pytest.raises(ValueError, match="got 1 for 2 images"):
        checker(images, targets[:1])


def test_missing_boxes(checker: FasterRCNN) -> None:
    images, targets = good()
    del targets[1]["boxes"]
    with pytest.raises(ValueError, match=r"targets\[1\] has no 'boxes' \(keys: \['labels'\]\)"):
        checker(images, targets)


def test_boxes_wrong_shape(checker: FasterRCNN) -> None:
    images, targets = good()
    targets[1]["boxes"] = torch.rand(2, 5)
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\] has shape \(2, 5\), expected \[K, 4\]"):
        checker(images, targets)


def test_int_boxes(checker: FasterRCNN) -> None:
    images, targets = good()
    targets[0]["boxes"] = targets[0]["boxes"].long()
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] has dtype torch.int64, expected a float dtype"):
        checker(images, targets)


def test_labels_length_mismatch(checker: FasterRCNN) -> None:
    images, targets = good()
    targets[1]["labels"] = torch.tensor([1])
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] has shape \(1,\), expected \[2\]"):
        checker(images, targets)


def test_degenerate_box_names_index_and_values(checker: FasterRCNN) -> None:
    images, targets = good()
    targets[1]["boxes"][1] = torch.tensor([30.0, 10.0, 30.0, 40.0])  # x2 == x1
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]\[1\] = \[30.0, 10.0, 30.0, 40.0\] is degenerate"):
        checker(images, targets)
    targets[1]["boxes"][1] = torch.tensor([30.0, 50.0, 40.0, 20.0])  # y2 < y1
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]\[1\] = \[30.0, 50.0, 40.0, 20.0\]"):
        checker(images, targets)


def test_nan_box(checker: FasterRCNN) -> None:
    images, targets = good()
    targets[0]["boxes"][0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]\[0\] = \[1.0, 2.0, nan, 40.0\] .*not finite"):
        checker(images, targets)


@pytest.mark.parametrize("bad", [0, NUM_CLASSES, -1])
def test_label_out_of_range(checker: FasterRCNN, bad: int) -> None:
    images, targets = good()
    targets[1]["labels"] = torch.tensor([2, bad])
    with pytest.raises(ValueError, match=rf"targets\[1\]\['labels'\]\[1\] = {bad} is out of range: labels are 1..3"):
        checker(images, targets)


def test_masks_wrong_shape(checker: FasterRCNN) -> None:
    images, targets = good()
    targets[0]["masks"] = torch.zeros(1, 64, 80, dtype=torch.uint8)  # right
    targets[1]["masks"] = torch.zeros(2, 64, 72, dtype=torch.uint8)  # (h, w) swapped
    with pytest.raises(ValueError, match=r"targets\[1\]\['masks'\] has shape \(2, 64, 72\), expected \[2, 72, 64\]"):
        checker(images, targets)


def test_valid_batch_passes_the_checks(checker: FasterRCNN) -> None:
    """The checks above are not triggered by a valid batch (so they are not vacuous)."""
    images, targets = good()
    losses = checker(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_float64_and_half_images_are_accepted() -> None:
    """Any float dtype is a valid image (the documented contract): float64 images (e.g. from numpy) and
    fp16/bf16 images are converted to the model's dtype instead of failing inside the first convolution."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    images, targets = images_and_targets()
    with torch.no_grad():
        ref = model(images)
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            got = model([img.to(dtype) for img in images])
            for i, (r, d) in enumerate(zip(ref, got)):
                assert d["boxes"].dtype == torch.float32
                if dtype == torch.float64:
                    assert_same_detections(r, d, f"{dtype} image {i}")
                else:  # rounded pixels: not the same detections, but as many and finite
                    assert len(d["boxes"]) > 0 and torch.isfinite(d["boxes"]).all()
    model.train()
    losses = model([img.double() for img in images], targets)
    assert all(torch.isfinite(v) for v in losses.values())


# ------------------------------------------------------------------------------------ empty targets
def empty_target() -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def test_some_images_without_boxes_train() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    images, targets = images_and_targets()
    images.insert(1, torch.rand(3, 90, 90))
    losses = train_step(model, images, [targets[0], empty_target(), targets[1]])
    assert losses["loss_rpn_box_reg"] > 0 and losses["loss_box_reg"] > 0


def test_all_images_without_boxes_train() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    images, _ = images_and_targets()
    losses = train_step(model, images, [empty_target(), empty_target()])
    # Nothing to regress: the box losses are exactly zero, the classifiers learn "background".
    assert losses["loss_rpn_box_reg"] == 0 and losses["loss_box_reg"] == 0
    assert losses["loss_objectness"] > 0 and losses["loss_classifier"] > 0


# ------------------------------------------------------------------------------------ loss regression
# A self-recorded regression guard, not a correctness reference. The values below were produced by this
# project's own code (print `seeded_losses()`; CPU, fp32; the same on 1 and 2 threads, with and without
# oneDNN) and stay because no independent library computes them: torchvision's samplers draw their random
# picks in another order and it has no width-8 ResNet-18, so the same seeds give other losses there. What they
# guard: an unintended change of the training math (anchors, matching, sampling, box coding, loss
# normalisation, initialisation, resizing) shows up as a changed loss. If you change that math on purpose,
# re-record them (print `seeded_losses()`) and say so in the commit message. Correctness itself is proved
# against torchvision independently: tests/detection/test_det_training_parity.py (the same converted R50-FPN,
# exhaustive sampling: the four losses and every gradient equal torchvision's).
# History: re-recorded after 9c95f08 (top-k balanced sampler: same distribution, another random order;
# the box losses, which use every positive here, did not change).
REFERENCE_STEP0 = {"loss_objectness": 0.6939776, "loss_rpn_box_reg": 0.05318539, "loss_classifier": 1.407258,
                   "loss_box_reg": 0.3602427}
REFERENCE_STEP1 = {"loss_objectness": 0.6919241, "loss_rpn_box_reg": 0.05022461, "loss_classifier": 0.8105619,
                   "loss_box_reg": 0.4472535}


def seeded_losses() -> tuple[dict[str, float], dict[str, float]]:
    """Losses of a fixed tiny model on fixed inputs, before and after one SGD step."""
    torch.manual_seed(0)
    model = tiny_model().train()
    images, targets = images_and_targets(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    torch.manual_seed(1)  # the samplers draw from the global generator
    step0 = model(images, targets)
    opt.zero_grad()
    sum(step0.values()).backward()
    opt.step()
    torch.manual_seed(2)
    step1 = model(images, targets)
    return {k: v.item() for k, v in step0.items()}, {k: v.item() for k, v in step1.items()}


def test_seeded_losses_are_reproducible_and_match_reference() -> None:
    first = seeded_losses()
    second = seeded_losses()
    assert first == second, "same seed, same inputs: the losses must be bit-identical"
    for got, ref in zip(first, (REFERENCE_STEP0, REFERENCE_STEP1)):
        assert set(got) == set(ref)
        for k in ref:
            # measured: 2.4e-7 relative at most (1 and 2 threads; mostly the 7 digits the references are
            # written with)
            assert got[k] == pytest.approx(ref[k], rel=3e-6, abs=0), f"{k}: {got[k]!r} != reference {ref[k]!r}"


# ---------------------------------------------------------------------------------- mixed precision
ARCHS = {
    "fpn": {},
    "c4_resnet": {"arch": "c4", "roi_pooler_resolution": 7},
    "c4_vgg16": {"backbone_name": "vgg16", "arch": "c4"},
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_autocast_train_step_and_eval(arch: str) -> None:
    """FPN and C4 (ResNet and VGG-16 trunks, narrow) train a step under CPU bf16 autocast with finite
    fp32 losses, and detect under autocast with fp32 outputs."""
    torch.manual_seed(0)
    model = tiny_model(**ARCHS[arch])
    if arch == "c4_vgg16":
        assert type(model.roi_heads.box_head).__name__ == "VGGFCHead"
    elif arch == "c4_resnet":
        assert type(model.roi_heads.box_head).__name__ == "Res5Head"
        assert list(model.backbone.output_shape()) == ["res4"]
    images, targets = images_and_targets()
    seen: list[torch.dtype] = []
    hook = model.backbone.register_forward_hook(lambda m, i, o: seen.extend(v.dtype for v in o.values()))
    train_step(model, images, targets, autocast=True)
    assert seen and set(seen) == {torch.bfloat16}, "autocast must really run the network in bf16"
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dets = model(images)
    hook.remove()
    assert set(seen) == {torch.bfloat16}
    assert len(dets) == 2
    for d, img in zip(dets, images):
        assert d["boxes"].dtype == torch.float32 and d["scores"].dtype == torch.float32
        assert d["labels"].dtype == torch.int64
        assert len(d["boxes"]) > 0 and torch.isfinite(d["boxes"]).all()
        assert (d["boxes"][:, 2] <= img.shape[2] + 1e-3).all() and (d["boxes"][:, 3] <= img.shape[1] + 1e-3).all()


def test_fp32_train_step_c4_resnet() -> None:
    torch.manual_seed(0)
    model = tiny_model(arch="c4", roi_pooler_resolution=7)
    images, targets = images_and_targets()
    train_step(model, images, targets)


# ---------------------------------------------------------------------------------- inference prep
def test_prepare_for_inference_keeps_detections() -> None:
    """Folding frozen BN into the convolutions and switching to channels-last changes no detection."""
    torch.manual_seed(0)
    model = tiny_model(backbone_norm="FrozenBN")
    perturb_frozen_bn(model, seed=0)  # non-trivial statistics, so that folding has something to fold
    n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert n_frozen > 10
    images, _ = images_and_targets()
    model.eval()
    with torch.no_grad():
        before = model(images)
        assert model.prepare_for_inference() is model
        after = model(images)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()), "every frozen BN is folded"
    conv_weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    for i, (b, a) in enumerate(zip(before, after)):
        assert len(b["boxes"]) >= 20
        assert_same_detections(b, a, f"image {i}")


# ----------------------------------------------------------------------------------------- interop
def test_torchvision_fpn_backbone_inside_our_faster_rcnn() -> None:
    torch.manual_seed(0)
    tv_body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                  norm_layer=nn.BatchNorm2d)
    model = build_faster_rcnn(**TINY, backbone_module=from_torchvision(tv_body))
    assert model.backbone.output_shape() == {f"p{k}": ShapeSpec(256, 2**k) for k in range(2, 7)}
    images, targets = images_and_targets()
    before = tv_body.body.layer1[0].conv1.weight.detach().clone()
    train_step(model, images, targets)
    assert not torch.equal(before, tv_body.body.layer1[0].conv1.weight), "the torchvision trunk is trained"
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert all(len(d["boxes"]) > 0 for d in dets)

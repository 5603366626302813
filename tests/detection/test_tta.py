"""Test-time augmentation of Faster R-CNN (detection.tta) on a tiny real detector: the identity case equals the
plain model, flip TTA equals an independent flip + un-flip + merge, a mirrored image gets mirrored detections,
and bad arguments are refused."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from detection.models import build_faster_rcnn
from detection.tta import DetectorWithTTA, augmentations

pytestmark = pytest.mark.usefixtures("single_thread")

# score_thresh 0: a random-weight model scores every class near 1/4, and the default 0.05 would keep only some;
# every test below asserts that there are detections to compare.
TINY = dict(backbone_name="resnet18", backbone_width=8, num_classes=3, backbone_norm="GN", freeze_at=0,
            fpn_channels=16, fc_dim=32, min_size=(64,), max_size=96, test_min_size=64, test_max_size=96,
            rpn_pre_nms_topk=(200, 100), rpn_post_nms_topk=(100, 50), score_thresh=0.0, detections_per_img=30)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_faster_rcnn(**TINY).eval()


def images(seed: int = 0) -> list[torch.Tensor]:
    """Two images of different sizes, both resized by the model (72x96 -> 64x85, 100x80 -> 80x64)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 72, 96, generator=g), torch.rand(3, 100, 80, generator=g)]


def mirror(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """xyxy boxes mirrored left-right in an image `width` pixels wide (the test's own arithmetic)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def match(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], *, tol: float) -> None:
    """The same detections, in any order among them: each of `ref` has one of `got` with its label, its score
    and its box within `tol`."""
    assert len(ref["boxes"]) == len(got["boxes"]) > 0
    unused = torch.ones(len(got["boxes"]), dtype=torch.bool)
    for box, score, label in zip(ref["boxes"], ref["scores"], ref["labels"]):
        close = unused & (got["labels"] == label) & ((got["scores"] - score).abs() <= tol)
        close &= (got["boxes"] - box).abs().amax(dim=1) <= tol
        assert close.any(), f"no match for label {int(label)} score {float(score)} box {box.tolist()}"
        unused[close.nonzero()[0, 0]] = False


def test_augmentations_are_every_size_with_and_without_flip():
    assert [(a.min_size, a.flip) for a in augmentations((200, 300), 500, True)] == [
        (200, False), (200, True), (300, False), (300, True)]
    assert [(a.min_size, a.max_size, a.flip) for a in augmentations()] == [(None, None, False)]


@torch.no_grad()
def test_no_augmentation_equals_the_plain_model_exactly(model):
    imgs = images()
    ref = model(imgs)
    got = DetectorWithTTA(model).eval()(imgs)
    for r, g in zip(ref, got):
        assert len(r["boxes"]) > 0
        # The merge re-runs the score threshold, per-class NMS and top-k on detections that passed them: all kept.
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(r[k], g[k]), k
    # The preprocessor is left as it was.
    assert (model.preprocessor.test_min_size, model.preprocessor.test_max_size) == (64, 96)


@torch.no_grad()
def test_flip_tta_equals_running_the_flipped_image_and_merging(model):
    imgs = images(1)
    tta = DetectorWithTTA(model, flip=True).eval()
    got = tta(imgs)
    plain = model(imgs)
    mirrored = model([img.flip(-1) for img in imgs])
    heads = model.roi_heads
    for img, p, m, g in zip(imgs, plain, mirrored, got):
        w = img.shape[-1]
        boxes = torch.cat([p["boxes"], mirror(m["boxes"], w)])
        scores = torch.cat([p["scores"], m["scores"]])
        labels = torch.cat([p["labels"], m["labels"]])
        keep = scores > heads.score_thresh
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        kept = batched_nms(boxes, scores, labels, heads.nms_thresh)[: heads.detections_per_img]
        ref = {"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]}
        match(ref, g, tol=0.0)  # the same values through the same float ops: equal (only the order may differ)
        # The merge did merge: fewer than the two runs' detections, no more than the model's cap.
        assert len(g["boxes"]) <= heads.detections_per_img < len(p["boxes"]) + len(m["boxes"])
        assert torch.all(g["scores"][:-1] >= g["scores"][1:])


@torch.no_grad()
def test_tta_of_a_mirrored_image_gives_the_mirrored_detections(model):
    tta = DetectorWithTTA(model, flip=True, min_sizes=(64, 80)).eval()
    for img in images(2):
        w = img.shape[-1]
        (direct,) = tta([img])
        (of_mirror,) = tta([img.flip(-1)])
        mirrored_back = {**of_mirror, "boxes": mirror(of_mirror["boxes"], w)}
        # measured: 3.3e-6 at most, in the boxes (x -> w - x -> w - (w - x) rounds in float32 at ~100 px)
        match(direct, mirrored_back, tol=1e-5)


@torch.no_grad()
def test_min_sizes_run_the_model_at_each_size(model):
    """A size list of one equals the plain model with that test size; the wrapper restores the model's own."""
    imgs = images(3)
    got = DetectorWithTTA(model, min_sizes=(80,), max_size=120).eval()(imgs)
    torch.manual_seed(0)
    other = build_faster_rcnn(**{**TINY, "test_min_size": 80, "test_max_size": 120}).eval()
    other.load_state_dict(model.state_dict())
    for r, g in zip(other(imgs), got):
        assert len(r["boxes"]) > 0
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(r[k], g[k]), k
    assert (model.preprocessor.test_min_size, model.preprocessor.test_max_size) == (64, 96)


def test_bad_arguments_are_clear_errors(model):
    with pytest.raises(ValueError, match=r"min_sizes=\[0\].*each > 0"):
        DetectorWithTTA(model, min_sizes=[0])
    with pytest.raises(ValueError, match="repeats a size"):
        DetectorWithTTA(model, min_sizes=(64, 64))
    with pytest.raises(ValueError, match=r"max_size=-1 must be a positive int"):
        DetectorWithTTA(model, max_size=-1)
    with pytest.raises(TypeError, match=r"wraps a detection\.FasterRCNN, got Linear"):
        DetectorWithTTA(torch.nn.Linear(2, 2))
    tta = DetectorWithTTA(model, flip=True)
    with pytest.raises(ValueError, match=r"for inference: call \.eval\(\)"):
        tta.train()(images())
    tta.eval()
    model.eval()


@torch.no_grad()
def test_c4_model_without_augmentation_equals_the_plain_model():
    torch.manual_seed(0)
    c4 = build_faster_rcnn(**{**TINY, "arch": "c4", "roi_pooler_resolution": 7}).eval()
    imgs = images(4)
    for r, g in zip(c4(imgs), DetectorWithTTA(c4).eval()(imgs)):
        assert len(r["boxes"]) > 0
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(r[k], g[k]), k


@torch.no_grad()
def test_an_image_with_non_finite_outputs_gets_no_detections_and_is_named():
    torch.manual_seed(0)
    broken = build_faster_rcnn(**TINY).eval()
    broken.roi_heads.predictor.bbox_pred.weight.fill_(float("nan"))  # every box of every image becomes NaN
    tta = DetectorWithTTA(broken, flip=True).eval()
    out = tta(images())
    assert [len(d["boxes"]) for d in out] == [0, 0]
    assert tta.nonfinite_images() == [0, 1]
    # A healthy model names none.
    healthy = DetectorWithTTA(build_faster_rcnn(**TINY).eval(), flip=True).eval()
    assert all(len(d["boxes"]) for d in healthy(images())) and healthy.nonfinite_images() == []

"""The strongest proof that the detector is right: torchvision's Faster R-CNN with random weights,
converted, gives the same detections as ours on real COCO images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from parity_helpers import (
    freeze_bn_like_torchvision_checkpoints,
    load_images,
    match_detections,
    perturb,
    without_common_component,
)

from detection.convert import load_torchvision_detector
from detection.models import build_faster_rcnn, torchvision_spec

# Smaller inputs and fewer proposals than the defaults (800 px, 1000) keep the test fast on a CPU; every
# code path is the same; the last test runs the defaults on one image (slow).
SIZE = 320
PROPOSALS = 300


def spread_classifier(model: torch.nn.Module, images: list[torch.Tensor], seed: int = 0) -> None:
    """Random box-head features share a large common component, so a random classifier picks the same
    class everywhere. Remove that component from the classifier weights: detections then have varied
    classes and well-separated scores, which makes the comparison meaningful."""
    feats = {}
    hook = model.roi_heads.box_head.register_forward_hook(lambda m, i, o: feats.__setitem__("x", o))
    with torch.no_grad():
        model(images)
    hook.remove()
    mu = feats["x"].mean(0)
    g = torch.Generator().manual_seed(seed)
    pred = model.roi_heads.box_predictor
    with torch.no_grad():
        w = torch.randn(pred.cls_score.weight.shape, generator=g)
        pred.cls_score.weight.copy_(without_common_component(w, mu))
        pred.cls_score.bias.zero_()
        pred.bbox_pred.weight.copy_(torch.randn(pred.bbox_pred.weight.shape, generator=g) * 0.01)


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2"])
def test_same_detections_as_torchvision(name: str, tiny_coco_src: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, num_classes=91,
                                                      min_size=SIZE, max_size=SIZE * 2,
                                                      rpn_post_nms_top_n_test=PROPOSALS).eval()
    perturb(ref)
    if name == "fasterrcnn_resnet50_fpn":
        freeze_bn_like_torchvision_checkpoints(ref)
    images = load_images(tiny_coco_src)
    spread_classifier(ref, images[:2])
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)  # through a file, as a user would
    ours = build_faster_rcnn(torchvision_spec(name).replace(test_min_size=SIZE, test_max_size=SIZE * 2,
                                                            rpn_post_nms_topk=(2000, PROPOSALS)))
    load_torchvision_detector(ours, str(path))
    ours.eval()
    labels_seen: set[int] = set()
    total = 0
    with torch.no_grad():
        for start in range(0, len(images), 4):
            batch = images[start:start + 4]
            for i, (r, g) in enumerate(zip(ref(batch), ours(batch))):
                match_detections(r, g, f"{name} image {start + i}")
                labels_seen |= set(r["labels"].tolist())
                total += len(r["boxes"])
    assert total >= 100, f"only {total} detections on 16 images: too few for a meaningful comparison"
    assert len(labels_seen) >= 3, "the perturbed model should predict varied classes"


@pytest.mark.slow
def test_same_detections_as_torchvision_at_the_default_800_px_and_1000_proposals(tiny_coco_src: Path) -> None:
    """The same comparison at torchvision's and our defaults (shorter side 800, longer at most 1333, 1000
    proposals per image after NMS at test time), on one real tiny-COCO image: nothing is scaled down."""
    name = "fasterrcnn_resnet50_fpn"
    torch.manual_seed(0)
    ref = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                               num_classes=91).eval()
    assert (ref.transform.min_size, ref.transform.max_size, ref.rpn._post_nms_top_n["testing"]) == ((800,), 1333, 1000)
    perturb(ref)
    freeze_bn_like_torchvision_checkpoints(ref)
    image = load_images(tiny_coco_src)[:1]
    spread_classifier(ref, image)
    ours = build_faster_rcnn(torchvision_spec(name))
    assert (ours.spec.input.test_min_size, ours.spec.input.test_max_size) == (800, 1333)
    assert ours.spec.rpn.post_nms_topk[1] == 1000
    load_torchvision_detector(ours, ref.state_dict())
    ours.eval()
    with torch.no_grad():
        r, g = ref(image)[0], ours(image)[0]
    assert len(r["boxes"]) >= 20, f"only {len(r['boxes'])} detections: too few for a meaningful comparison"
    match_detections(r, g, f"{name} at 800 px")

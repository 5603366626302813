"""torchvision's Mask R-CNN with random weights, converted, gives the same detections and the same
instance masks as ours on the real images of tiny COCO (the detection parity test, plus masks)."""

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
from segmentation import build_mask_rcnn, torchvision_mask_spec

# Smaller inputs, fewer proposals and detections than the defaults (800 px, 1000, 100) keep the test fast on
# a CPU (the 4-conv box head of v2 and the mask head run per RoI); every code path is the same. A low score
# threshold keeps DETECTIONS per image, so every image contributes masks of varied classes.
SIZE = 256
PROPOSALS = 100
DETECTIONS = 25
SCORE_THRESH = 0.001
NUM_IMAGES = 4


def spread_classifiers(model: torch.nn.Module, images: list[torch.Tensor], seed: int = 0) -> None:
    """Spread the class and mask weights (see `without_common_component`): detections then have varied
    classes and well-separated scores, and their masks have shapes (not empty or full)."""
    feats = {}
    hooks = [model.roi_heads.box_head.register_forward_hook(lambda m, i, o: feats.__setitem__("box", o)),
             model.roi_heads.mask_predictor.mask_fcn_logits.register_forward_hook(
                 lambda m, i, o: feats.__setitem__("mask", i[0]))]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(seed)
    pred = model.roi_heads.box_predictor
    logits = model.roi_heads.mask_predictor.mask_fcn_logits
    with torch.no_grad():
        w = torch.randn(pred.cls_score.weight.shape, generator=g)
        pred.cls_score.weight.copy_(without_common_component(w, feats["box"].mean(0)))
        pred.cls_score.bias.zero_()
        pred.bbox_pred.weight.copy_(torch.randn(pred.bbox_pred.weight.shape, generator=g) * 0.01)
        w = logits.weight.flatten(1)
        logits.weight.copy_(without_common_component(w, feats["mask"].mean((0, 2, 3))).view_as(logits.weight))
        logits.bias.zero_()


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_same_detections_and_masks_as_torchvision(name: str, tiny_coco_src: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, num_classes=91,
                                                      min_size=SIZE, max_size=SIZE * 2,
                                                      rpn_post_nms_top_n_test=PROPOSALS,
                                                      box_detections_per_img=DETECTIONS,
                                                      box_score_thresh=SCORE_THRESH).eval()
    perturb(ref)
    if name == "maskrcnn_resnet50_fpn":
        freeze_bn_like_torchvision_checkpoints(ref)
    images = load_images(tiny_coco_src)[:NUM_IMAGES]
    spread_classifiers(ref, images[:1])
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)  # through a file, as a user would
    detector, mask = torchvision_mask_spec(name)
    ours = build_mask_rcnn(detector.replace(test_min_size=SIZE, test_max_size=SIZE * 2,
                                            rpn_post_nms_topk=(2000, PROPOSALS), detections_per_img=DETECTIONS,
                                            score_thresh=SCORE_THRESH), mask)
    load_torchvision_detector(ours, str(path))
    ours.eval()
    labels_seen: set[int] = set()
    ious, areas = [], []
    with torch.no_grad():
        for i, (r, g) in enumerate(zip(ref(images), ours(images))):
            where = f"{name} image {i}"
            h, w = images[i].shape[-2:]
            assert g["masks"].shape == (len(g["boxes"]), 1, h, w) and g["masks"].dtype == torch.float32
            for a, b in match_detections(r, g, where):
                mr, mg = r["masks"][a, 0] >= 0.5, g["masks"][b, 0] >= 0.5
                union = (mr | mg).sum()
                iou = 1.0 if union == 0 else float((mr & mg).sum() / union)
                assert iou >= 0.99, f"{where}: mask IoU {iou:.4f} for label {int(r['labels'][a])}"
                ious.append(iou)
                areas.append(int(mr.sum()))
            labels_seen |= set(r["labels"].tolist())
    assert len(ious) >= 100, f"only {len(ious)} detections: too few for a meaningful comparison"
    assert len(labels_seen) >= 3, "the perturbed model should predict varied classes"
    # Real mask shapes were compared, not empty masks that agree trivially.
    assert sum(a >= 20 for a in areas) >= 0.8 * len(areas), f"mask areas {sorted(areas)[:20]}... are mostly tiny"

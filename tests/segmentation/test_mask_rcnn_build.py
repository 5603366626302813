"""Mask R-CNN is built directly (its RoI heads by `MaskRoIHeads`' own constructor), with the same modules,
state-dict keys and seeded initial parameters as the earlier build-then-clone path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import seghelpers as H
import torch

from detection.poolers import RoIPooler
from detection.roi_heads import TwoMLPHead
from segmentation import MaskRCNNHead, MaskRoIHeads

REFERENCE = Path(__file__).parent / "data" / "tiny_mask_rcnn_reference.json"


def test_same_keys_shapes_and_seeded_parameters_as_the_reference() -> None:
    """The reference was recorded from the pre-change builder (Faster R-CNN first, then its RoI heads
    cloned into `MaskRoIHeads.from_box_heads`): key order, shapes, and each tensor's sum and absolute sum
    after `torch.manual_seed(0)`. Equal values prove the modules are initialised in the same order."""
    ref = json.loads(REFERENCE.read_text())["state_dict"]
    torch.manual_seed(0)
    model = H.tiny_mask_rcnn()
    sd = model.state_dict()
    assert [k for k, *_ in ref] == list(sd)
    for key, shape, total, abs_total in ref:
        v = sd[key].double()
        assert list(v.shape) == shape, key
        assert float(v.sum()) == pytest.approx(total, rel=1e-6, abs=1e-5), key
        assert float(v.abs().sum()) == pytest.approx(abs_total, rel=1e-6, abs=1e-5), key


def test_mask_roi_heads_are_constructed_not_cloned() -> None:
    model = H.tiny_mask_rcnn()
    heads = model.roi_heads
    assert type(heads) is MaskRoIHeads and not hasattr(MaskRoIHeads, "from_box_heads")
    assert [n for n, _ in heads.named_children()] == ["box_pooler", "box_head", "predictor", "mask_pooler",
                                                      "mask_head"]
    # In-channels from the FPN's output_shape(), pooler strides from the levels it reads.
    shapes = model.backbone.output_shape()
    assert heads.mask_head.convs[0].in_channels == shapes["p2"].channels == 16
    assert heads.in_features == ("p2", "p3", "p4", "p5")
    assert heads.mask_head.num_classes == heads.num_classes == H.NUM_CLASSES


def test_mask_head_classes_must_match_the_box_branch() -> None:
    pooler = RoIPooler([4, 8], 7)
    with pytest.raises(ValueError, match=r"mask_head predicts 3 classes but the box head 5.*num_classes=5"):
        MaskRoIHeads(("p2", "p3"), pooler, TwoMLPHead(8, 7, 16), 5, mask_pooler=RoIPooler([4, 8], 14),
                     mask_head=MaskRCNNHead(8, 3, conv_dim=8))

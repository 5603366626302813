"""`segmentation.maskrcnn_resnet50_fpn(_v2)`: torchvision's Mask R-CNN architectures under torchvision's names,
weights from a checkpoint file or torchvision's weight enums (torch's hub cache, hash verified)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from hub_helpers import hub_file_named_by_its_hash
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, MaskRCNN_ResNet50_FPN_Weights

import segmentation
from backbone.weights import WeightsError
from detection.convert import convert_torchvision_detection


def _same_as_converted(model: torch.nn.Module, tv_state: dict) -> bool:
    got = model.state_dict()
    return all(torch.equal(got[k], v) for k, v in convert_torchvision_detection(tv_state).items()
               if not k.endswith("num_batches_tracked"))


def test_coco_v1_from_the_hub_cache_and_the_same_file_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    cached = hub_file_named_by_its_hash(tmp_path, monkeypatch, entry, tv.state_dict())

    model = segmentation.maskrcnn_resnet50_fpn(weights="COCO_V1")
    assert isinstance(model, segmentation.MaskRCNN) and model.num_classes == 91
    assert model.roi_heads.mask_head.predictor.out_channels == 91
    assert _same_as_converted(model, tv.state_dict())
    by_path = segmentation.maskrcnn_resnet50_fpn(weights=str(cached), test_min_size=320)
    assert by_path.preprocessor.test_min_size == 320 and _same_as_converted(by_path, tv.state_dict())


def test_v2_offline_without_the_file_names_file_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    entry = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1
    with pytest.raises(WeightsError, match=re.escape(entry.url.rsplit("/", 1)[1])) as err:
        segmentation.maskrcnn_resnet50_fpn_v2(weights="DEFAULT")
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(err.value) and entry.url in str(err.value)


def test_v2_without_weights_is_torchvisions_architecture() -> None:
    model = segmentation.maskrcnn_resnet50_fpn_v2(num_classes=3, backbone_width=8, fpn_channels=16, fc_dim=32,
                                                  mask_conv_dim=16, roi_conv_dim=16)
    assert model.num_classes == 3 and model.spec.num_classes == 2 and model.spec.task == "instance"
    assert type(model.roi_heads.mask_head.convs[0].norm).__name__ == "BatchNorm2d"  # v2: BN in the mask head
    assert type(model.roi_heads.box_head).__name__ == "ConvFCHead" and len(model.rpn.head.conv) == 2

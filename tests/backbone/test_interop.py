"""Our backbone inside torchvision's detectors, and timm models as our backbones."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator

from backbone import FPN, TimmBackbone, TorchvisionBackbone, build_backbone


def _targets(with_masks: bool = False) -> list[dict[str, torch.Tensor]]:
    out = []
    for boxes in ([[10.0, 12.0, 60.0, 70.0]], [[5.0, 5.0, 40.0, 30.0], [50.0, 40.0, 110.0, 90.0]]):
        b = torch.tensor(boxes)
        t = {"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)}
        if with_masks:
            m = torch.zeros(len(b), 96, 128, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(b.int().tolist()):
                m[i, y0:y1, x0:x1] = 1
            t["masks"] = m
        out.append(t)
    return out


def _one_step(model: torch.nn.Module, with_masks: bool = False) -> dict[str, torch.Tensor]:
    model.train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = model(images, _targets(with_masks))
    total = sum(losses.values())
    opt.zero_grad()
    total.backward()
    opt.step()
    assert torch.isfinite(total)
    return losses


def _fpn() -> TorchvisionBackbone:
    return TorchvisionBackbone(FPN(build_backbone("resnet18", width=8, norm="FrozenBN"), out_channels=32))


def test_out_channels_and_names() -> None:
    wrapped = _fpn()
    assert wrapped.out_channels == 32
    assert list(wrapped(torch.rand(1, 3, 64, 64))) == ["0", "1", "2", "3", "pool"]


def test_torchvision_faster_rcnn_trains_with_our_backbone() -> None:
    model = FasterRCNN(_fpn(), num_classes=3, min_size=96, max_size=128)
    losses = _one_step(model)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def test_torchvision_mask_rcnn_trains_with_our_backbone() -> None:
    model = MaskRCNN(_fpn(), num_classes=3, min_size=96, max_size=128)
    assert "loss_mask" in _one_step(model, with_masks=True)


def test_torchvision_retinanet_trains_with_our_backbone() -> None:
    trunk = build_backbone("resnet18", width=8, out_features=("res3", "res4", "res5"))
    fpn = FPN(trunk, out_channels=32, top_block="p6p7", top_block_in="res5")
    anchors = AnchorGenerator(tuple((s,) for s in (32, 64, 128, 256, 512)), ((0.5, 1.0, 2.0),) * 5)
    model = RetinaNet(TorchvisionBackbone(fpn), num_classes=3, anchor_generator=anchors, min_size=96, max_size=128)
    assert set(_one_step(model)) == {"classification", "bbox_regression"}


def test_mixed_channels_rejected() -> None:
    with pytest.raises(ValueError, match="same channels"):
        TorchvisionBackbone(build_backbone("resnet18", width=8))


def test_timm_features_only_as_our_backbone() -> None:
    trunk = TimmBackbone("resnet18", out_indices=(1, 2, 3, 4))
    shapes = trunk.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res2": (64, 4), "res3": (128, 8), "res4": (256, 16), "res5": (512, 32)}
    fpn = FPN(trunk, out_channels=16)
    out = fpn(torch.rand(1, 3, 64, 96))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "p2": (16, 16, 24), "p3": (16, 8, 12), "p4": (16, 4, 6), "p5": (16, 2, 3), "p6": (16, 1, 2)}
    assert trunk.feature_info.reduction() == [4, 8, 16, 32]


def test_timm_adapter_rejects_non_feature_model() -> None:
    with pytest.raises(TypeError, match="features_only"):
        TimmBackbone(torch.nn.Conv2d(3, 3, 1))


def test_from_torchvision_declares_probed_shapes() -> None:
    from torchvision.models import resnet18
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from backbone import from_torchvision

    fpn = from_torchvision(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5))
    assert {k: (s.channels, s.stride) for k, s in fpn.output_shape().items()} == {
        "p2": (256, 4), "p3": (256, 8), "p4": (256, 16), "p5": (256, 32), "p6": (256, 64)}
    trunk = from_torchvision(IntermediateLayerGetter(resnet18(), {"layer2": "a", "layer4": "b"}), fpn=False)
    assert {k: (s.channels, s.stride) for k, s in trunk.output_shape().items()} == {"res3": (128, 8), "res5": (512, 32)}
    out = trunk(torch.rand(1, 3, 64, 96))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {"res3": (128, 8, 12), "res5": (512, 2, 3)}

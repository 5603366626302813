"""`detection.fasterrcnn_resnet50_fpn(_v2)`: torchvision's architectures under torchvision's names, with
weights from a checkpoint file or from torchvision's weight enums through torch's hub cache (verified)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from hub_helpers import hub_file_named_by_its_hash
from parity_helpers import (
    freeze_bn_like_torchvision_checkpoints,
    load_images,
    match_detections,
    perturb,
    without_common_component,
)
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights, FasterRCNN_ResNet50_FPN_Weights

import detection
from backbone.weights import WeightsError, torchvision_weights_entry
from detection.convert import convert_torchvision_detection

SIZE = 256
PROPOSALS = 300


def test_weights_file_gives_torchvision_detections(tiny_coco_src: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=SIZE, max_size=SIZE * 2,
        rpn_post_nms_top_n_test=PROPOSALS).eval()
    perturb(ref)
    freeze_bn_like_torchvision_checkpoints(ref)
    images = load_images(tiny_coco_src)[:2]
    feats = {}
    hook = ref.roi_heads.box_head.register_forward_hook(lambda m, i, o: feats.__setitem__("x", o))
    with torch.no_grad():
        ref(images[:1])
        hook.remove()
        g = torch.Generator().manual_seed(0)
        pred = ref.roi_heads.box_predictor
        pred.cls_score.weight.copy_(without_common_component(torch.randn(pred.cls_score.weight.shape, generator=g),
                                                             feats["x"].mean(0)))
        pred.cls_score.bias.zero_()
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)

    ours = detection.fasterrcnn_resnet50_fpn(weights=str(path), test_min_size=SIZE, test_max_size=SIZE * 2,
                                             rpn_post_nms_topk=(2000, PROPOSALS)).eval()
    assert ours.num_classes == 91 and ours.spec.num_classes == 90  # torchvision's count vs foreground classes
    total = 0
    with torch.no_grad():
        for i, (r, g) in enumerate(zip(ref(images), ours(images))):
            match_detections(r, g, f"image {i}")
            total += len(r["boxes"])
    assert total >= 20, total


def test_coco_v1_resolves_through_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1
    torch.manual_seed(0)
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    hub_file_named_by_its_hash(tmp_path, monkeypatch, entry, tv.state_dict())
    model = detection.fasterrcnn_resnet50_fpn_v2(weights="COCO_V1")
    assert model.num_classes == len(entry.meta["categories"]) == 91
    expected = convert_torchvision_detection(tv.state_dict())
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items() if not k.endswith("num_batches_tracked"))
    # As torchvision's builder with weights (trainable_backbone_layers=3): stem and res2 frozen.
    trunk = model.backbone.bottom_up
    assert not any(p.requires_grad for p in [*trunk.stem.parameters(), *trunk.res2.parameters()])
    assert all(p.requires_grad for p in trunk.res3.parameters())
    # The other spellings name the same file.
    for spelling in ("DEFAULT", "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1", entry):
        assert torchvision_weights_entry("fasterrcnn_resnet50_fpn_v2", spelling) is entry


def test_our_checkpoint_file_and_its_class_count(tmp_path: Path) -> None:
    small = {"backbone_width": 8, "fpn_channels": 16, "fc_dim": 32}
    torch.manual_seed(0)
    first = detection.fasterrcnn_resnet50_fpn(num_classes=5, **small)
    path = tmp_path / "ours.pth"
    torch.save(first.state_dict(), path)
    torch.manual_seed(1)
    again = detection.fasterrcnn_resnet50_fpn(weights=path, **small)  # num_classes taken from the file
    assert again.num_classes == 5
    assert all(torch.equal(again.state_dict()[k], v) for k, v in first.state_dict().items())
    with pytest.raises(ValueError, match=r"num_classes=91 but the weights .*ours\.pth have 5 classes"):
        detection.fasterrcnn_resnet50_fpn(weights=path, num_classes=91, **small)


def test_offline_without_the_file_names_file_folder_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    entry = FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    name = entry.url.rsplit("/", 1)[1]
    with pytest.raises(WeightsError, match=re.escape(name)) as err:
        detection.fasterrcnn_resnet50_fpn(weights="COCO_V1")
    msg = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg and entry.url in msg and "disabled" in msg


def test_a_file_with_a_wrong_hash_prefix_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = Path(torch.hub.get_dir()) / "checkpoints" / FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    path.write_bytes(b"an interrupted download")
    with pytest.raises(WeightsError, match=rf"{re.escape(str(path))} is damaged.*258fb6c6"):
        detection.fasterrcnn_resnet50_fpn(weights="COCO_V1")


def test_bad_weight_names_and_class_counts() -> None:
    with pytest.raises(ValueError, match=r"'COCO_V2' is not a weight of torchvision's fasterrcnn_resnet50_fpn.*V1"):
        detection.fasterrcnn_resnet50_fpn(weights="COCO_V2")
    with pytest.raises(ValueError, match=r"are not fasterrcnn_resnet50_fpn's \(FasterRCNN_ResNet50_FPN_Weights\)"):
        detection.fasterrcnn_resnet50_fpn(weights="MaskRCNN_ResNet50_FPN_Weights.COCO_V1")
    # Checked before any file is looked for.
    with pytest.raises(ValueError, match=r"num_classes=5 but the weights torchvision's .*COCO_V1 have 91 classes"):
        detection.fasterrcnn_resnet50_fpn(weights="COCO_V1", num_classes=5)

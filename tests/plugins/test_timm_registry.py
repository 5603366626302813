"""Our backbones as timm models: registry, feature_info, features equal to ours, classifier API, weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import backbone
from backbone import BACKBONES, build_backbone, register_timm_models, save_safetensors, timm_name
from backbone.weights import WeightsError

RESNET_OUTS = ("res2", "res3", "res4", "res5")


def test_every_backbone_is_a_timm_model_after_import_and_registration_is_idempotent() -> None:
    listed = set(timm.list_models("resnetdet_*"))
    assert listed == {timm_name(n) for n in BACKBONES}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns "Overwriting ..." on a second registration
        assert sorted(register_timm_models()) == sorted(listed)
    assert set(timm.list_models("resnetdet_*")) == listed


@pytest.mark.parametrize("name", [n for n in BACKBONES if not n.startswith(("vgg", "cifar"))])
def test_feature_info_of_res2_to_res5_equals_our_output_shape(name: str) -> None:
    model = timm.create_model(timm_name(name), features_only=True, out_indices=(1, 2, 3, 4), width=8)
    ours = build_backbone(name, out_features=RESNET_OUTS, width=8).output_shape()
    assert model.feature_info.channels() == [s.channels for s in ours.values()]
    assert model.feature_info.reduction() == [s.stride for s in ours.values()]


def _copy_into_ours(features_model: torch.nn.Module, ours: torch.nn.Module) -> None:
    sd = {k[len("model.body."):]: v for k, v in features_model.state_dict().items() if k.startswith("model.body.")}
    missing, _ = ours.load_state_dict(sd, strict=False)
    assert not missing, missing


@pytest.mark.parametrize(("name", "taps", "size"), [
    ("resnet50", RESNET_OUTS, 64),
    ("resnet50v2", RESNET_OUTS, 64),
    ("plain34", RESNET_OUTS, 64),
    ("vgg16_bn", ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5"), 64),
    ("cifar_resnet20", ("stem", "res2", "res3", "res4"), 32),
])
def test_features_equal_our_backbone_on_the_same_weights(name: str, taps: tuple[str, ...], size: int) -> None:
    torch.manual_seed(0)
    n = len(taps)
    indices = tuple(range(1, 5)) if taps == RESNET_OUTS else tuple(range(n))
    model = timm.create_model(timm_name(name), features_only=True, out_indices=indices, width=8).eval()
    ours = build_backbone(name, out_features=taps, width=8).eval()
    _copy_into_ours(model, ours)
    x = torch.rand(2, 3, size, size + 16)
    with torch.no_grad():
        got, want = model(x), list(ours(x).values())
    assert len(got) == len(want)
    for g, w, tap in zip(got, want, taps):
        assert g.shape == w.shape, tap
        assert (g - w).abs().max().item() <= 1e-6, tap


def test_stem_feature_is_the_stride_2_map_before_max_pooling() -> None:
    model = timm.create_model("resnetdet_resnet18", features_only=True, out_indices=(0,), width=8).eval()
    assert model.feature_info.reduction() == [2] and model.feature_info.channels() == [8]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        (stem,) = model(x)
        body = model.model.body
        assert torch.equal(body.stem.pool(stem), body.stem(x))


def test_classifier_api_as_timm_users_expect() -> None:
    model = timm.create_model("resnetdet_resnet18", num_classes=7, width=8).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        assert logits.shape == (2, 7) and feats.shape == (2, 64, 2, 2)
        # measured: 0: the same ops on the same features, so exact
        assert torch.equal(model.forward_head(feats), logits)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    assert model.get_classifier().out_features == 7 and model.num_classes == 7
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == "resnetdet_resnet18" and cfg["classifier"] == "fc"
    assert cfg["url"].endswith("resnet18-f37072fd.pth") and cfg["mean"] == (0.485, 0.456, 0.406)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)          # pooled features, timm's num_classes=0
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 64, 2, 2)    # no pooling
    final, inter = model.forward_intermediates(x, indices=(1, 4))
    assert final.shape == (2, 64, 2, 2) and [t.shape[1] for t in inter] == [8, 64]


def test_local_weights_through_timm_load_ours_and_torchvision(tmp_path: Path) -> None:
    x = torch.rand(2, 3, 64, 64)
    # Our Keras-style classifier saved as safetensors.
    keras = backbone.resnet18(classes=1000).eval()
    ours_file = save_safetensors(keras, tmp_path / "r18.safetensors")
    model = timm.create_model("resnetdet_resnet18", pretrained=True,
                              pretrained_cfg_overlay={"file": str(ours_file)}).eval()
    with torch.no_grad():
        assert (model(x) - keras(x)).abs().max().item() <= 1e-5
    # torchvision's ImageNet layout (random weights through a file, as a user's download would be).
    tv = torchvision.models.resnet18().eval()
    tv_file = tmp_path / "resnet18-f37072fd.pth"
    torch.save(tv.state_dict(), tv_file)
    model = timm.create_model("resnetdet_resnet18", pretrained=True, pretrained_cfg_overlay={"file": str(tv_file)})
    feats = timm.create_model("resnetdet_resnet18", pretrained=True, features_only=True, out_indices=(4,),
                              pretrained_cfg_overlay={"file": str(tv_file)}).eval()
    with torch.no_grad():
        assert (model.eval()(x) - tv(x)).abs().max().item() <= 1e-5
        body = torch.nn.Sequential(*list(tv.children())[:-2])
        assert (feats(x)[0] - body(x)).abs().max().item() <= 1e-5


def test_bad_arguments_and_mismatched_weights_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="output_stride=16 is not supported"):
        timm.create_model("resnetdet_resnet18", features_only=True, output_stride=16)
    with pytest.raises(ValueError, match="drop_path_rate"):
        timm.create_model("resnetdet_resnet18", drop_path_rate=0.1)
    wrong = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet18().state_dict(), wrong)
    with pytest.raises(WeightsError, match=r"lack \d+ trunk entries"):
        timm.create_model("resnetdet_resnet50", pretrained=True, pretrained_cfg_overlay={"file": str(wrong)})

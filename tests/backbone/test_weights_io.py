"""Weight files: safetensors export/import, ImageNet cache resolution, strict reports, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import backbone
from backbone import WeightsError, load_weights, read_state_dict, resolve_imagenet_weights, save_safetensors


def test_safetensors_round_trip(tmp_path: Path) -> None:
    model = backbone.resnet18(width=8, classes=5).eval()
    path = save_safetensors(model, tmp_path / "r18.safetensors")
    again = backbone.resnet18(width=8, classes=5, weights=str(path)).eval()
    assert again.load_report.ok and again.load_report.source_format == "ours_classifier"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_backbone_safetensors_round_trip(tmp_path: Path) -> None:
    body = backbone.build_backbone("resnet50v2", width=8).eval()
    path = save_safetensors(body, tmp_path / "body.safetensors")
    again = backbone.build_backbone("resnet50v2", width=8)
    assert load_weights(again, path).ok
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(body(x)["res5"], again.eval()(x)["res5"])


def test_imagenet_uses_torchvision_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    ckpt = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    ckpt.parent.mkdir(parents=True)
    ref = torchvision.models.resnet18(weights=None).eval()
    torch.save(ref.state_dict(), ckpt)
    assert resolve_imagenet_weights("resnet18") == ckpt
    model = backbone.resnet18(weights="imagenet").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_imagenet_missing_names_file_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=r"resnet50-0676ba61\.pth.*" + str(tmp_path / "hub" / "checkpoints")):
        backbone.resnet50(weights="imagenet")


def test_imagenet_v2_missing_names_hf_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*models--timm--resnetv2_50\.a1h_in1k"):
        backbone.resnet50v2(weights="imagenet")


def test_no_imagenet_weights_for_unknown_arch() -> None:
    with pytest.raises(WeightsError, match="resnet152v2"):
        resolve_imagenet_weights("resnet152v2")


def test_strict_report_lists_missing_and_unexpected(tmp_path: Path) -> None:
    sd = backbone.resnet18(width=8).state_dict()
    sd.pop("body.res3.0.conv1.weight")
    sd["body.res3.0.extra"] = torch.zeros(1)
    expected = r"1 missing: body\.res3\.0\.conv1\.weight.*1 unexpected: body\.res3\.0\.extra"
    with pytest.raises(WeightsError, match=expected):
        load_weights(backbone.resnet18(width=8), sd)
    report = load_weights(backbone.resnet18(width=8), sd, strict=False)
    assert report.missing == ["body.res3.0.conv1.weight"] and report.unexpected == ["body.res3.0.extra"]


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"could not read weights file .*bad\.pth"):
        read_state_dict(bad)
    txt = tmp_path / "w.txt"
    txt.write_text("x")
    with pytest.raises(WeightsError, match=r"suffix '\.txt'"):
        read_state_dict(txt)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    """weights_only=True: a checkpoint holding arbitrary objects is rejected, not executed."""
    import argparse

    path = tmp_path / "obj.pth"
    torch.save({"args": argparse.Namespace(a=1), "model": {}}, path)
    with pytest.raises(WeightsError, match="could not read"):
        read_state_dict(path)


def test_wrapped_and_ddp_prefixed_state_dicts(tmp_path: Path) -> None:
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    assert backbone.resnet18(weights=str(path)).load_report.ok

"""Weight files: safetensors export/import, ImageNet cache resolution, strict reports, bad files."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
import torchvision
from hub_helpers import hub_file_named_by_its_hash
from torchvision.models import ResNet18_Weights, ResNet50_Weights

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


def test_imagenet_uses_torchvision_cache_through_the_weight_enum(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ref = torchvision.models.resnet18(weights=None).eval()
    ckpt = hub_file_named_by_its_hash(tmp_path, monkeypatch, ResNet18_Weights.IMAGENET1K_V1, ref.state_dict())
    assert resolve_imagenet_weights("resnet18") == ckpt
    model = backbone.resnet18(weights="imagenet").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        # measured: 0 (the same weights, the same ops); atol 1e-6 for float32 kernels on other CPUs
        assert torch.allclose(model(x), ref(x), rtol=0, atol=1e-6)


def test_imagenet_file_with_a_wrong_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file under torchvision's published name whose SHA-256 does not start with the name's digits (here:
    random weights) is damaged or not the published file: the error names it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]  # resnet18-f37072fd.pth
    ckpt = Path(torch.hub.get_dir()) / "checkpoints" / name
    ckpt.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), ckpt)
    with pytest.raises(WeightsError, match=rf"{re.escape(str(ckpt))} is damaged.*SHA-256.*f37072fd.*Delete it"):
        resolve_imagenet_weights("resnet18")
    with pytest.raises(WeightsError, match=re.escape(name)):
        backbone.resnet18(weights="imagenet")


def test_imagenet_missing_names_file_folder_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=r"resnet50-0676ba61\.pth.*" + str(tmp_path / "hub" / "checkpoints")) as err:
        backbone.resnet50(weights="imagenet")
    assert ResNet50_Weights.IMAGENET1K_V1.url in str(err.value) and "disabled" in str(err.value)


def test_imagenet_v2_missing_names_hf_folder_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*models--timm--resnetv2_50\.a1h_in1k") as err:
        backbone.resnet50v2(weights="imagenet")
    assert "https://huggingface.co/timm/resnetv2_50.a1h_in1k/resolve/main/model.safetensors" in str(err.value)


def _hf_snapshot(cache: Path, repo_id: str, commit: str, filename: str, data: bytes, *, ref: bool = True) -> Path:
    """A file in huggingface_hub's cache layout: `blobs/<sha256>`, `snapshots/<commit>/<file>` linking to it,
    `refs/main` naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True)
    link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return link


def _timm_resnetv2_file(tmp_path: Path) -> bytes:
    from safetensors.torch import save_file

    timm = pytest.importorskip("timm")
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnetv2_50").state_dict().items()}, str(path))
    return path.read_bytes()


def test_imagenet_v2_from_the_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    data = _timm_resnetv2_file(tmp_path)
    link = _hf_snapshot(cache, "timm/resnetv2_50.a1h_in1k", "a" * 40, "model.safetensors", data)
    assert resolve_imagenet_weights("resnet50v2") == link
    body = backbone.build_backbone("resnet50v2")
    assert load_weights(body, resolve_imagenet_weights("resnet50v2")).source_format == "timm_resnetv2"


def test_hf_cache_without_a_main_ref_takes_the_newest_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """No `refs/main` (e.g. a copied cache): the most recently modified revision is used, not the
    alphabetically last folder."""
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    older = _hf_snapshot(cache, "timm/resnetv2_50.a1h_in1k", "f" * 40, "model.safetensors", b"older", ref=False)
    newer = _hf_snapshot(cache, "timm/resnetv2_50.a1h_in1k", "0" * 40, "model.safetensors", b"newer", ref=False)
    for path, when in ((older, 1_000_000_000), (newer, 1_500_000_000)):
        for p in (path, path.parent, path.resolve()):
            os.utime(p, (when, when), follow_symlinks=False)
    assert resolve_imagenet_weights("resnet50v2") == newer


def test_hf_blob_that_does_not_match_its_name_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    link = _hf_snapshot(cache, "timm/resnetv2_50.a1h_in1k", "a" * 40, "model.safetensors", b"published")
    link.resolve().write_bytes(b"truncated")
    with pytest.raises(WeightsError, match=r"model\.safetensors.*damaged"):
        resolve_imagenet_weights("resnet50v2")


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

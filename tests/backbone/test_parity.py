"""Parity with torchvision and timm: their random weights, saved to a file, loaded into ours.

Logits and stage features must match to 1e-5 absolute (fp32), as the README says. BN statistics and affine
parameters are perturbed so that a wrong mapping of any of them shows.

Measured (this CPU, 2026-12-02): every comparison here is bit-identical (0.0) except the timm resnetv2_50
logits, 1.2e-7 (logits up to 0.29, stage features up to 19); the bound of 1e-5 leaves room for another
CPU's kernels (summation order), while a wrong mapping gives differences of the order of the values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor

import backbone
from backbone import load_weights

TOL = 1e-5  # absolute; measured 0.0 (1.2e-7 for the resnetv2_50 logits)


def _perturb_bn(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


def real_images(tiny_coco_src: Path, size: tuple[int, int] = (160, 224), n: int = 2) -> torch.Tensor:
    """A few real COCO images, resized and ImageNet-normalised, `(n, 3, H, W)`."""
    files = sorted((tiny_coco_src / "images").glob("*.jpg"))[:n]
    tf = torchvision.transforms.Compose([
        torchvision.transforms.Resize(size),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    return torch.stack([tf(Image.open(f).convert("RGB")) for f in files])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet101"])
def test_torchvision_resnet_parity(arch: str, tmp_path: Path, tiny_coco_src: Path) -> None:
    ref = getattr(torchvision.models, arch)(weights=None).eval()
    _perturb_bn(ref)
    path = tmp_path / f"{arch}.pth"
    torch.save(ref.state_dict(), path)
    ours = getattr(backbone, arch)(weights=str(path)).eval()
    assert ours.load_report.ok and ours.load_report.source_format == "torchvision_resnet"
    x = real_images(tiny_coco_src)
    stages = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}
    extractor = create_feature_extractor(ref, return_nodes={**{k: k for k in stages}, "fc": "fc"})
    body = backbone.build_backbone(arch)
    load_weights(body, str(path))  # a bare backbone loads the same file, head set aside
    body.eval()
    with torch.no_grad():
        ref_out = extractor(x)
        assert _max_diff(ours(x), ref_out["fc"]) <= TOL
        feats = body(x)
        for tv_name, our_name in stages.items():
            assert _max_diff(feats[our_name], ref_out[tv_name]) <= TOL, our_name


@pytest.mark.parametrize("arch", ["vgg16", "vgg16_bn"])
def test_torchvision_vgg_parity(arch: str, tmp_path: Path, tiny_coco_src: Path) -> None:
    ref = getattr(torchvision.models, arch)(weights=None).eval()
    _perturb_bn(ref)
    path = tmp_path / f"{arch}.pth"
    torch.save(ref.state_dict(), path)
    ours = getattr(backbone, arch)(weights=str(path)).eval()
    x = real_images(tiny_coco_src, size=(128, 160))
    # conv5_3 after its ReLU is the last module before pool5 in torchvision's `features`.
    conv5_idx = len(ref.features) - 2
    body = backbone.build_backbone(arch, out_features=("conv3", "conv4", "conv5", "pool5"))
    load_weights(body, str(path))
    body.eval()
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= TOL
        feats = body(x)
        assert _max_diff(feats["conv5"], ref.features[: conv5_idx + 1](x)) <= TOL
        assert _max_diff(feats["pool5"], ref.features(x)) <= TOL
    assert body.output_shape()["conv5"].stride == 16


def test_timm_resnet50_parity(tmp_path: Path, tiny_coco_src: Path) -> None:
    ref = timm.create_model("resnet50", pretrained=False).eval()
    _perturb_bn(ref)
    path = tmp_path / "timm_resnet50.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = backbone.resnet50(weights=str(path)).eval()
    x = real_images(tiny_coco_src)
    feats_ref = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    feats_ref.load_state_dict(ref.state_dict(), strict=False)
    feats_ref.eval()
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= TOL
        body = backbone.build_backbone("resnet50")
        load_weights(body, str(path))
        got = body.eval()(x)
        for name, t in zip(("res2", "res3", "res4", "res5"), feats_ref(x)):
            assert _max_diff(got[name], t) <= TOL, name


def test_timm_resnetv2_50_parity(tmp_path: Path, tiny_coco_src: Path) -> None:
    ref = timm.create_model("resnetv2_50", pretrained=False).eval()
    _perturb_bn(ref)
    path = tmp_path / "resnetv2_50.pth"
    torch.save(ref.state_dict(), path)
    ours = backbone.resnet50v2(weights=str(path)).eval()
    assert ours.load_report.source_format == "timm_resnetv2"
    x = real_images(tiny_coco_src)
    with torch.no_grad():
        logits_ref = ref(x)
        assert _max_diff(ours(x), logits_ref) <= TOL  # measured 1.2e-7 (logits up to 0.29)
        body = backbone.build_backbone("resnet50v2")
        load_weights(body, str(path))
        got = body.eval()(x)
        ref_stages = ref.stem(x)
        for i, name in enumerate(("res2", "res3", "res4", "res5")):
            ref_stages = ref.stages[i](ref_stages)
            assert _max_diff(got[name], ref_stages) <= TOL, name  # measured 0.0 (values up to 1.7)
        assert _max_diff(ours.forward_features(x), ref.forward_features(x)) <= TOL  # measured 0.0

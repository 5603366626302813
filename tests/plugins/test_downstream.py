"""Our backbones inside the libraries people build on, by timm name: smp, transformers, effdet.

(torchvision's FasterRCNN / MaskRCNN / RetinaNet with our FPN: tests/backbone/test_interop.py.)
"""

from __future__ import annotations

import pytest
import torch

import backbone  # noqa: F401  (registers resnetdet_* with timm)


def _encoder_grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]


@pytest.mark.parametrize("arch", ["Unet", "FPN"])
def test_smp_model_with_our_encoder_trains_one_step(arch: str) -> None:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = getattr(smp, arch)("tu-resnetdet_resnet50", encoder_weights=None, classes=3)
    x, y = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items() if v.is_floating_point()}
    out = model(x)
    assert out.shape == (2, 3, 64, 64)
    loss = torch.nn.functional.cross_entropy(out, y)
    assert torch.isfinite(loss)
    loss.backward()
    grads = _encoder_grads(model.encoder)
    assert grads and any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    changed = [k for k, v in model.encoder.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any("res2" in k for k in changed) and any("res5" in k for k in changed)
    # The encoder is ours: its feature strides are the ResNet's.
    assert list(model.encoder.model.feature_info.reduction()) == [2, 4, 8, 16, 32]


def test_transformers_detr_with_our_timm_backbone_returns_a_finite_loss() -> None:
    from transformers import DetrConfig, DetrForObjectDetection

    torch.manual_seed(0)
    config = DetrConfig(use_timm_backbone=True, backbone="resnetdet_resnet50", use_pretrained_backbone=False,
                        num_labels=3, num_queries=10, d_model=64, encoder_layers=1, decoder_layers=1,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2)
    model = DetrForObjectDetection(config)
    conv = model.model.backbone.model
    assert type(conv.model).__name__ == "TimmClassifier" and conv.model.arch == "resnet50"
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
              {"class_labels": torch.tensor([2, 0]),
               "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.3, 0.3]])}]
    out = model(pixel_values=torch.rand(2, 3, 64, 96), labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert _encoder_grads(conv)  # the backbone trains


def test_effdet_with_our_backbone_trains_one_step() -> None:
    from effdet import DetBenchTrain, EfficientDet, get_efficientdet_config

    torch.manual_seed(0)
    config = get_efficientdet_config("tf_efficientdet_d0")
    config.backbone_name = "resnetdet_resnet18"
    config.backbone_indices = (2, 3, 4)
    config.backbone_args = {}  # effdet's default asks for stochastic depth, which our ResNets do not have
    config.image_size = (256, 256)
    config.num_classes = 3
    net = EfficientDet(config, pretrained_backbone=False)
    bench = DetBenchTrain(net)
    target = {"bbox": torch.tensor([[[10.0, 10.0, 60.0, 70.0]], [[20.0, 20.0, 90.0, 120.0]]]),
              "cls": torch.tensor([[1.0], [2.0]])}
    out = bench(torch.rand(2, 3, 256, 256), target)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert _encoder_grads(net.backbone)

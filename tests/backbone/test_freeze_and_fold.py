"""freeze_at, norms, and folding frozen BN into convolutions."""

from __future__ import annotations

import pytest
import torch

from backbone import (
    FPN,
    Conv2d,
    FrozenBatchNorm2d,
    ResNet,
    build_backbone,
    count_trainable,
    fold_frozen_batchnorm,
)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("depth", [18, 50])
def test_trainable_parameter_counts_per_freeze_at(depth: int) -> None:
    full = ResNet(depth, width=8, norm="BN")
    parts = [_params(full.stem)] + [_params(getattr(full, n)) for n in ("res2", "res3", "res4", "res5")]
    total = sum(parts)
    assert count_trainable(full) == total
    for k in range(6):
        model = ResNet(depth, width=8, norm="BN", freeze_at=k)
        assert count_trainable(model) == total - sum(parts[:k]), k
        stages = [getattr(model, n) for n in ("res2", "res3", "res4", "res5")]
        for m in [model.stem, *stages][:k]:
            assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()), "frozen stages use frozen BN"


def test_freeze_at_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"freeze_at=6.*0 \(nothing frozen\) up to 5"):
        ResNet(18, width=8, freeze_at=6)
    with pytest.raises(ValueError, match="freeze_at=3"):
        ResNet(18, width=8, out_features=("res2",), freeze_at=3)


def test_vgg_freeze_at() -> None:
    full = build_backbone("vgg16", width=8)
    frozen = build_backbone("vgg16", width=8, freeze_at=2)
    assert count_trainable(frozen) == count_trainable(full) - _params(full.block1) - _params(full.block2)


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "FrozenBN", "GN", "none"])
def test_norm_choices_build_and_run(norm: str) -> None:
    model = ResNet(18, width=8, norm=norm).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out["res5"]).all()
    assert all(not isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) or norm in ("BN", "SyncBN")


def test_unknown_norm_raises_at_construction() -> None:
    with pytest.raises(ValueError, match=r"norm='LN'"):
        ResNet(18, norm="LN")


def test_frozen_bn_loads_bn_state_dict_and_matches_eval_bn() -> None:
    bn = torch.nn.BatchNorm2d(8).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked accepted and dropped
    x = torch.randn(2, 8, 5, 5)
    # measured: 4.8e-7 (float32: x * scale + shift vs BN's (x - mean) / sqrt(var + eps) * w + b)
    assert torch.allclose(frozen(x), bn(x), atol=1e-6)


@pytest.mark.parametrize("depth", [18, 50])
def test_folded_bn_gives_same_output(depth: int) -> None:
    model = FPN(ResNet(depth, width=8, norm="BN"), out_channels=16, norm="BN")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model = FrozenBatchNorm2d.convert(model).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        n = fold_frozen_batchnorm(model)
        got = model(x)
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    assert n == len(convs) and all(isinstance(m.norm, torch.nn.Identity) for m in convs)
    for k in ref:
        # measured: 1.1e-4 abs at most, half of this rtol + atol allowance (R-50: random BN statistics folded into 50
        # float32 convs round otherwise)
        assert torch.allclose(ref[k], got[k], rtol=1e-4, atol=1e-4), k


def test_training_conv_folds_frozen_bn_on_the_fly() -> None:
    """In training mode a conv followed by frozen BN runs as one conv with scaled weights: same outputs
    and weight gradients as the two separate steps (up to fp32 rounding)."""
    conv = Conv2d(4, 6, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(6), activation=torch.nn.ReLU())
    conv.norm.running_mean.uniform_(-0.5, 0.5)
    conv.norm.running_var.uniform_(0.5, 2)
    conv.norm.weight.uniform_(0.5, 1.5)
    conv.norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 4, 9, 11)
    conv.train()
    fused = conv(x)
    fused.square().sum().backward()
    g_fused = conv.weight.grad.clone()
    conv.weight.grad = None
    conv.eval()  # the separate conv -> BN -> ReLU path
    ref = conv(x)
    ref.square().sum().backward()
    # measured: outputs 6.0e-7 at most; weight gradients (up to 260 in size) 6.1e-5, 0.12 of the rtol 1e-4 + atol 1e-5
    # allowance (this input, and seeds 0-4)
    assert torch.allclose(fused, ref, atol=1e-5) and torch.allclose(g_fused, conv.weight.grad, rtol=1e-4, atol=1e-5)

"""timm's model contract, checked on every registered ``resnetdet_*`` model, and graph capture of every
backbone: the config agrees with what forward computes, ``features_only`` / ``forward_intermediates`` /
``prune_intermediate_layers`` behave as timm defines them, ``torch.fx`` (and torchvision's
``create_feature_extractor``) and TorchScript give the eager outputs.

Narrow models (width 8, CIFAR nets 4) at full depth keep each case cheap; one intra-op thread.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from backbone import BACKBONES, FPN, build_backbone, timm_name
from backbone.vgg import VGG_OUTPUTS

NAMES = sorted(BACKBONES)
# One of each block / stem / shortcut kind: v1 basic and bottleneck, v2, plain, CIFAR (shortcut A, plain), VGG.
KINDS = ["resnet18", "resnet50", "resnet50v2", "plain18", "cifar_resnet20", "cifar_plain20", "vgg16", "vgg16_bn"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _narrow(name: str) -> dict[str, int]:
    return {"width": 4 if name.startswith("cifar") else 8}


def _levels(name: str) -> int:
    return 4 if name.startswith("cifar") else 6 if name.startswith("vgg") else 5


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(timm_name(name), **_narrow(name), **kwargs).eval()


def _all_outputs(name: str) -> tuple[str, ...]:
    if name.startswith("vgg"):
        return VGG_OUTPUTS
    return ("stem", "res2", "res3", "res4") + (() if name.startswith("cifar") else ("res5",))


# -- pretrained_cfg agrees with forward -----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_config_agrees_with_forward(name: str) -> None:
    model = _create(name)
    cfg = model.pretrained_cfg
    cifar = name.startswith("cifar")
    assert cfg["input_size"] == ((3, 32, 32) if cifar else (3, 224, 224))
    x = torch.randn(1, *cfg["input_size"])
    sd = model.state_dict()
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model(x)
        # The unpooled map has num_features channels at pool_size; pre-logits are head_hidden_size wide.
        assert feats.shape == (1, model.num_features, *cfg["pool_size"])
        assert pre.shape == (1, model.head_hidden_size)
        assert logits.shape == (1, cfg["num_classes"]) and model.num_classes == cfg["num_classes"]
        classifier = model.get_classifier()
        assert classifier is dict(model.named_modules())[cfg["classifier"]]
        assert classifier.in_features == model.head_hidden_size and sd[cfg["classifier"] + ".weight"].shape[0] == (
            10 if cifar else 1000)
        assert sd[cfg["first_conv"] + ".weight"].shape[1] == 3
        assert model.head_hidden_size == (4096 if name.startswith("vgg") else model.num_features)
        # reset_classifier(0): forward gives the pre-logits themselves; with global_pool="" the map itself.
        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)
        assert torch.equal(model(x), pre)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), feats)
        model.reset_classifier(5, "avg")
        assert model(x).shape == (1, 5) and model.get_classifier().in_features == model.head_hidden_size
        unpooled = _create(name, num_classes=0, global_pool="")
        assert unpooled(x).shape == feats.shape
    # min_input_size is the smallest side the model takes; one pixel less is a clear error.
    side = cfg["min_input_size"][-1]
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, side, side)).shape[-1] == math.ceil(
            side / (4 if cifar else 32))
    with pytest.raises(ValueError, match=f"at least {side}"):
        model(torch.randn(1, 3, side - 1, side))


def test_vgg_keeps_fc6_fc7_as_pre_logits_and_drops_them_only_when_pruned() -> None:
    model = _create("vgg16")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        fc6 = model.fc_head.fc6.weight.clone()
        model.reset_classifier(0, "")        # no pooling: fc6/fc7 are bypassed, not dropped ...
        model.reset_classifier(0, "avg")     # ... so pooling brings the same pre-logits back
        assert torch.equal(model.fc_head.fc6.weight, fc6) and torch.equal(model(x), pre)
    model.prune_intermediate_layers([-1], prune_head=True)
    assert model.fc_head is None and model.fc is None


# -- features_only and forward_intermediates -------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_features_only_default_out_indices_give_every_level(name: str) -> None:
    model = _create(name, features_only=True)
    info = model.feature_info
    # timm's default out_indices (0..4): every level; the CIFAR nets declare their 4, VGG-16 takes conv1..conv5
    # as timm's own VGG does (pool5, index 5, on request).
    assert info.out_indices == ((0, 1, 2, 3) if name.startswith("cifar") else (0, 1, 2, 3, 4))
    assert len(info.channels()) == len(info.out_indices)
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        got = model(x)
    want = [(1, c, 32 // r, 64 // r) for c, r in zip(info.channels(), info.reduction())]
    assert [tuple(t.shape) for t in got] == want


@pytest.mark.parametrize("name", KINDS)
def test_features_only_equals_forward_intermediates_on_the_same_weights(name: str) -> None:
    features = _create(name, features_only=True)
    clf = _create(name)
    own = features.state_dict()
    missing, unexpected = features.load_state_dict(
        {"model." + k: v for k, v in clf.state_dict().items() if "model." + k in own}, strict=False)
    assert not missing and not unexpected
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        got = features(x)
        want = clf.forward_intermediates(x, indices=list(range(len(got))), intermediates_only=True)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("name", KINDS)
def test_forward_intermediates_as_timm_defines_it(name: str) -> None:
    model = _create(name)
    n = len(model.feature_info)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(inter) == n
        for t, info in zip(inter, model.feature_info):
            assert t.shape == (2, info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])
        # indices: an int n takes the last n, negatives count from the end, the order asked is kept.
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last2, inter[-2:])) and len(last2) == 2
        picked = model.forward_intermediates(x, indices=[-1, 1], intermediates_only=True)
        assert torch.equal(picked[0], inter[-1]) and torch.equal(picked[1], inter[1])
        # stop_early: same features; the final map is the deepest one taken.
        early_final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(early[0], inter[1]) and torch.equal(early_final, inter[1])
        # norm: the final BN + ReLU of v2 nets on the last feature gives forward_features.
        normed = model.forward_intermediates(x, indices=[n - 1], norm=True, intermediates_only=True)[0]
        assert torch.equal(normed, final)
        if name.endswith("v2"):
            assert not torch.equal(inter[-1], final)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="channels in dim 1"):
        model.forward_intermediates(x.permute(0, 2, 3, 1))


@pytest.mark.parametrize("name", ["resnet18", "resnet50v2", "cifar_resnet20", "vgg16_bn"])
def test_prune_intermediate_layers_drops_what_the_features_do_not_need(name: str) -> None:
    model = _create(name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    n_params = sum(p.numel() for p in model.parameters())
    assert model.prune_intermediate_layers([1, 2]) == [1, 2]
    assert sum(p.numel() for p in model.parameters()) < n_params   # the deep stages and the head are gone
    assert model.fc is None and not any(k.startswith(("body.res4", "body.block4", "fc.")) for k in model.state_dict())
    with torch.no_grad():
        after = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(ValueError, match="pruned"):
        model.forward_intermediates(x, indices=[3])
    with pytest.raises(ValueError, match="pruned"):
        model.forward_features(x)
    with pytest.raises(ValueError, match="pruned already"):
        model.prune_intermediate_layers([3])


# -- torch.fx and torchvision's feature extraction ------------------------------------------------------
def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_and_feature_extractor_give_the_eager_outputs(name: str) -> None:
    torch.manual_seed(0)
    trunk = build_backbone(name, out_features=_all_outputs(name), **_narrow(name)).eval()
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        want = trunk(x)
        _assert_same(torch.fx.symbolic_trace(trunk)(x), want)
        modules = [f"block{o[-1]}" if o.startswith("conv") else o for o in want]  # VGG: conv<k> is block<k>
        extractor = create_feature_extractor(trunk, return_nodes=dict(zip(modules, want)))
        _assert_same(extractor(x), want)
    # The input check is a node of the traced graph: the graph still refuses a bad input clearly.
    with pytest.raises(ValueError, match=r"expects a \(N, C, H, W\) tensor, got shape \(3, 32, 64\)"):
        extractor(x[0])


@pytest.mark.parametrize("name", KINDS)
def test_fx_trace_of_the_timm_classifier_gives_the_eager_outputs(name: str) -> None:
    clf = _create(name)
    x = torch.randn(1, 3, 64, 64)
    traced = torch.fx.symbolic_trace(clf)
    with torch.no_grad():
        assert torch.equal(traced(x), clf(x))
    with pytest.raises(ValueError, match="channels in dim 1"):
        traced(torch.randn(1, 64, 64, 3))


@pytest.mark.parametrize("top_block", ["maxpool", "p6p7"])
def test_fx_trace_of_the_fpn_gives_the_eager_outputs(top_block: str) -> None:
    torch.manual_seed(0)
    fpn = FPN(build_backbone("resnet18", width=8), out_channels=16, top_block=top_block).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = fpn(x)
        _assert_same(torch.fx.symbolic_trace(fpn)(x), want)
        extractor = create_feature_extractor(fpn, return_nodes={"bottom_up.res4": "c4", "output.0": "p2"})
        got = extractor(x)
        assert torch.equal(got["p2"], want["p2"])
        assert torch.equal(got["c4"], fpn.bottom_up(x)["res4"])


def test_fx_traced_classifier_trains_every_parameter() -> None:
    model = _create("resnet50v2", num_classes=7).train()
    traced = torch.fx.symbolic_trace(model)
    traced(torch.randn(2, 3, 64, 64)).mean().backward()
    assert all(p.grad is not None for p in traced.parameters())


# -- TorchScript -------------------------------------------------------------------------------------------
def _script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in favour of torch.compile
        return torch.jit.script(module)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet50v2", "cifar_resnet20", "vgg16_bn"])
def test_torchscript_gives_the_eager_outputs(name: str) -> None:
    torch.manual_seed(0)
    trunk = build_backbone(name, out_features=_all_outputs(name), freeze_at=2, **_narrow(name)).eval()
    clf = _create(name, num_classes=7)
    x = torch.randn(2, 3, 64, 96)
    scripted_trunk, scripted_clf = _script(trunk), _script(clf)
    with torch.no_grad():
        _assert_same(scripted_trunk(x), trunk(x))
        assert torch.equal(scripted_clf(x), clf(x))
        # An FX trace scripts too (the root forward's annotations are resolved types, not strings).
        assert torch.equal(_script(torch.fx.symbolic_trace(clf))(x), clf(x))
    # Training mode: the frozen stages (stem and the first stage) fold their frozen BN on the fly in eager, and
    # run conv + frozen BN scripted: the same function up to rounding.
    trunk.train()
    scripted_trunk.train()
    with torch.no_grad():
        want, got = trunk(x), scripted_trunk(x)
    for k in list(want)[:2]:
        # measured: 5.3e-6 abs at most (eager folds frozen BN into the conv on the fly, scripted runs conv then BN;
        # float32)
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
    # Scripted code raises torch.jit.Error carrying our ValueError's message.
    with pytest.raises(torch.jit.Error, match=r"ValueError: \w+ expects a \(N, C, H, W\) tensor"):
        scripted_trunk(x[0])


@pytest.mark.parametrize("top_block, norm", [("maxpool", "none"), ("p6p7", "BN"), ("none", "GN")])
def test_torchscript_of_the_fpn_gives_the_eager_outputs(top_block: str, norm: str) -> None:
    """The scripted top-down pass (the ModuleLists enumerated, not indexed) is the eager one, saved and loaded too;
    on an odd-sized input, where the upsampling goes to each lateral's own size."""
    torch.manual_seed(0)
    fpn = FPN(build_backbone("resnet18", width=8), out_channels=16, norm=norm, top_block=top_block).eval()
    x = torch.randn(2, 3, 70, 99)
    scripted = _script(fpn)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    with torch.no_grad():
        want = fpn(x)
        _assert_same(scripted(x), want)
        _assert_same(torch.jit.load(buffer)(x), want)

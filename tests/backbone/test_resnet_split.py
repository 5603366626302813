"""`ResNet.split_last_stage`: the public way a C4 detector hands res5 to its per-RoI head."""

from __future__ import annotations

import pytest
import torch

from backbone import ResNet, ShapeSpec


def test_split_keeps_modules_keys_and_outputs() -> None:
    torch.manual_seed(0)
    net = ResNet(50, out_features=("res4", "res5"), width=8).eval()
    keys = list(net.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = net(x)
    res5_module = net.res5
    trunk, res5 = net.split_last_stage()
    assert trunk is net and res5 is res5_module  # nothing copied or re-initialised
    assert trunk.output_shape() == {"res4": ShapeSpec(128, 16)} and trunk.size_divisibility == 16
    assert list(trunk.state_dict()) + [f"res5.{k}" for k in res5.state_dict()] == keys
    with torch.no_grad():
        after = trunk(x)
        assert list(after) == ["res4"] and torch.equal(after["res4"], before["res4"])
        assert torch.equal(res5(after["res4"]), before["res5"])


def test_split_down_to_the_stem_then_refuse() -> None:
    net = ResNet(18, out_features=("res2",), width=8)
    trunk, stage = net.split_last_stage()
    assert trunk.out_features == ("stem",) and isinstance(stage, torch.nn.Sequential)
    with pytest.raises(ValueError, match="ResNet has no stage to split off"):
        trunk.split_last_stage()

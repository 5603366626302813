"""Optimizer parameter groups, lr scaling, and the warmup + multistep/cosine schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from resnet_det.config import SolverConfig
from resnet_det.engine import WarmupLR, build_lr_scheduler, build_optimizer, lr_multiplier


def _model() -> nn.Module:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False), nn.GroupNorm(2, 4))
    m[0].weight.requires_grad_(False)  # frozen: must not be optimised
    return m


def _lrs(sched: WarmupLR, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def test_warmup_is_linear_from_warmup_factor_to_one():
    kw = dict(max_iter=100, steps=(50,), warmup_iters=10, warmup_factor=0.1)
    # measured: 0 on each check of this test (Python float schedule arithmetic); rel 1e-12
    assert lr_multiplier(0, **kw) == pytest.approx(0.1, rel=1e-12)
    assert lr_multiplier(5, **kw) == pytest.approx(0.55, rel=1e-12)
    assert lr_multiplier(10, **kw) == pytest.approx(1.0, rel=1e-12)
    assert lr_multiplier(9, **kw) == pytest.approx(0.1 * 0.1 + 0.9, rel=1e-12)


def test_multistep_decays_by_gamma_at_each_step_through_the_scheduler():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = SolverConfig(lr=1.0, max_iter=30, steps=(10, 20), gamma=0.5, warmup_iters=4, warmup_factor=0.2)
    lrs = _lrs(build_lr_scheduler(opt, cfg), 30)
    assert lrs[0] == pytest.approx(0.2, rel=1e-12)  # measured: 0 on each check of this test; rel 1e-12
    assert lrs[2] == pytest.approx(0.2 * 0.5 + 0.5, rel=1e-12)
    assert lrs[4:10] == pytest.approx([1.0] * 6, rel=1e-12)
    assert lrs[10:20] == pytest.approx([0.5] * 10, rel=1e-12)
    assert lrs[20:] == pytest.approx([0.25] * 10, rel=1e-12)


def test_cosine_reaches_zero_at_max_iter():
    kw = dict(max_iter=100, scheduler="cosine", warmup_iters=0)
    assert lr_multiplier(0, **kw) == pytest.approx(1.0, rel=1e-12)  # measured: 0 on each check of this test; rel 1e-12
    assert lr_multiplier(50, **kw) == pytest.approx(0.5, rel=1e-12)
    assert lr_multiplier(100, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(99, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)), rel=1e-12)
    with pytest.raises(ValueError, match="cosine"):
        lr_multiplier(0, max_iter=10, scheduler="linear")


def test_scheduler_state_round_trip_keeps_the_exact_lr():
    cfg = SolverConfig(lr=0.1, max_iter=40, scheduler="cosine", warmup_iters=5)
    model = _model()
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg)
    _lrs(sched, 13)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expected = _lrs(sched, 10)

    model2 = _model()
    opt2 = build_optimizer(model2, cfg)
    sched2 = build_lr_scheduler(opt2, cfg)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert sched2.last_epoch == 13
    assert _lrs(sched2, 10) == expected  # exactly, not approximately


def test_param_groups_weight_decay_and_frozen_params():
    cfg = SolverConfig(lr=0.02, weight_decay=1e-4, weight_decay_norm=0.0, weight_decay_bias=1e-5)
    model = _model()
    opt = build_optimizer(model, cfg)
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert id(model[0].weight) not in by_id  # frozen
    assert by_id[id(model[0].bias)] == 1e-5
    assert by_id[id(model[1].weight)] == 0.0 and by_id[id(model[1].bias)] == 0.0  # BatchNorm
    assert by_id[id(model[3].weight)] == 0.0  # GroupNorm
    assert by_id[id(model[2].weight)] == 1e-4
    assert len(by_id) == sum(p.requires_grad for p in model.parameters())


def test_lr_is_scaled_linearly_by_the_reference_batch():
    cfg = SolverConfig(lr=0.02, ims_per_batch=4, reference_batch_size=16)
    opt = build_optimizer(_model(), cfg)
    assert all(g["lr"] == pytest.approx(0.005, rel=1e-12) for g in opt.param_groups)  # measured: 0 (0.02 * 4 / 16)
    opt = build_optimizer(_model(), SolverConfig(optimizer="adamw", lr=1e-4, adamw_betas=(0.8, 0.9)))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_no_trainable_parameters_is_a_clear_error():
    model = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, SolverConfig())

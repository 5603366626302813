"""EMA of the weights (train.ema, test.use_ema) on the tiny real detector: timm ModelEmaV3's update rule with
a decay warm-up, buffers copied, one update per optimizer step, evaluation of the average with the trained
weights restored bit for bit, checkpoints that hold it and an exact in-process resume."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from engine_fakes import with_options
from safetensors.torch import load_file
from tiny_detection import ListLoader, tiny_detector, tiny_images

from resnet_det.config import Config, SolverConfig, config_from_dict, dump_config, load_config
from resnet_det.engine import Checkpointer, HookBase, ModelEma, Trainer, build_lr_scheduler, build_optimizer
from resnet_det.engine.launch import ema_weights

SOLVER = SolverConfig(lr=0.02, max_iter=4, steps=(3,), warmup_iters=1, warmup_factor=0.5)
BATCHES = [tiny_images(2, seed) for seed in range(4)]


class _Snapshots(HookBase):
    """After each iteration: the trained weights and the EMA (the trainer's own hooks ran before)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.ema: list[dict[str, torch.Tensor]] = []

    def after_step(self) -> None:
        t = self.trainer
        self.weights.append({k: v.detach().clone() for k, v in t.model.state_dict().items()})
        self.ema.append({k: v.clone() for k, v in t.ema.shadow.items()})


def _trainer(out: Path, *, max_iter: int = 4, decay: float = 0.6, warmup_iters: int = 0, **kw) -> Trainer:
    model = tiny_detector(backbone_norm="BN", freeze_at=0)  # running statistics: buffers that change
    opt = build_optimizer(model, SOLVER)
    ema = ModelEma(model, decay=decay, warmup_iters=warmup_iters)
    kw = {"progress": False, "curves": False, "log_period": 1, "checkpoint_period": 100, **kw}
    return Trainer(model, opt, build_lr_scheduler(opt, SOLVER), ListLoader(BATCHES), device="cpu",
                   max_iter=max_iter, output_dir=out, ema=ema, **with_options(kw))


def test_the_decay_warms_up_from_a_copy_to_the_configured_decay():
    ema = ModelEma(torch.nn.Linear(2, 2), decay=0.999, warmup_iters=100)
    assert ema.decay_at(1) == 0.0, "the first update copies the weights"
    values = [ema.decay_at(t) for t in range(1, 2000)]
    # measured: 2.1e-9: the warmup's exp(-1998 / 100) still left at t = 1999 (not rounding); abs 1e-8 bounds it
    assert all(a < b for a, b in itertools.pairwise(values)) and values[-1] == pytest.approx(0.999, abs=1e-8)
    assert ema.decay_at(101) == pytest.approx(0.999 * (1 - math.exp(-1)), rel=1e-12)  # measured: 0
    flat = ModelEma(torch.nn.Linear(2, 2), decay=0.9, warmup_iters=0)
    assert [flat.decay_at(t) for t in (1, 2, 50)] == [0.0, 0.9, 0.9]
    for bad in (1.0, -0.1, "0.9"):
        with pytest.raises(ValueError, match="decay"):
            ModelEma(torch.nn.Linear(2, 2), decay=bad)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 iterations of the tiny detector with an EMA (decay 0.6), snapshots after each."""
    out = tmp_path_factory.mktemp("ema_straight")
    trainer = _trainer(out)
    snaps = _Snapshots()
    trainer.register_hooks([snaps])
    trainer.train()
    return {"out": out, "trainer": trainer, "snaps": snaps}


@pytest.mark.slow
def test_each_optimizer_step_moves_the_average_and_copies_the_buffers(straight):
    snaps, ema = straight["snaps"], straight["trainer"].ema
    params = {k for k, _ in straight["trainer"].model.named_parameters()}
    buffers = [k for k in snaps.weights[0] if k not in params]
    assert any("running_mean" in k for k in buffers) and ema.updates == 4
    expected = dict(snaps.weights[0])  # the first update is a copy
    for step in range(4):
        w, e = snaps.weights[step], snaps.ema[step]
        if step > 0:
            d = ema.decay_at(step + 1)
            expected = {k: d * expected[k] + (1 - d) * w[k] if k in params else w[k] for k in w}
        for k in w:
            if k in params:
                # lerp's rounding against this a*x + b*y: measured max difference 2.4e-7 (fp32, 4 steps).
                torch.testing.assert_close(e[k], expected[k], rtol=0, atol=1e-6, msg=k)
            else:
                assert torch.equal(e[k], w[k]), f"buffer {k} is copied"
    moved = [k for k in params if not torch.equal(snaps.ema[-1][k], snaps.weights[-1][k])]
    assert len(moved) > 10, "the average differs from the trained weights"


@pytest.mark.slow
def test_evaluation_sees_the_average_and_training_continues_bit_for_bit(tmp_path, straight):
    seen: list[dict[str, torch.Tensor]] = []

    def eval_fn(model, iteration):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"AP": 0.0}

    trainer = _trainer(tmp_path, eval_fn=eval_fn, eval_period=2, eval_with_ema=True)
    trainer.train()
    assert len(seen) == 2  # at iteration 2 and at the end
    for got, at in zip(seen, (1, 3)):
        assert all(torch.equal(got[k], straight["snaps"].ema[at][k]) for k in got), "the EMA weights were evaluated"
    final = trainer.model.state_dict()
    assert all(torch.equal(v, straight["snaps"].weights[-1][k]) for k, v in final.items()), \
        "evaluating the average changed the training"


@pytest.mark.slow
def test_checkpoints_hold_the_average_and_resume_continues_it_exactly(tmp_path, straight):
    first = _trainer(tmp_path, max_iter=2)
    first.train()
    second = _trainer(tmp_path, max_iter=4)
    second.ema.shadow = {k: torch.zeros_like(v) for k, v in second.ema.shadow.items()}  # must be replaced
    second.train(resume=True)
    assert second.start_iter == 2 and second.ema.updates == 4
    ref = straight["trainer"]
    for k, v in ref.ema.shadow.items():
        assert torch.equal(second.ema.shadow[k], v), f"EMA {k} after the resume"
    for k, v in ref.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[k], v), k
    _, state = Checkpointer(tmp_path).load("model_final")
    assert state["ema"]["updates"] == 4
    exported = load_file(tmp_path / "model_final_ema.safetensors")
    for source in (exported, ema_weights(tmp_path / "model_final.safetensors"),
                   ema_weights(tmp_path / "model_final_ema.safetensors")):
        assert set(source) == set(ref.ema.shadow) and all(torch.equal(source[k], ref.ema.shadow[k]) for k in source)


def test_ema_weights_of_a_checkpoint_without_one_is_a_clear_error(tmp_path):
    trainer = _trainer(tmp_path, max_iter=1)
    trainer.ema = None
    trainer.train()
    with pytest.raises(ValueError, match=r"holds no EMA .*trained without train\.ema"):
        ema_weights(tmp_path / "model_final")


def test_config_keys_default_off_and_check_their_values(tmp_path):
    cfg = Config()
    assert cfg.train.ema is None and cfg.test.use_ema is False and cfg.solver.accumulate == 1
    text = dump_config(cfg, tmp_path / "c.yaml").read_text()
    assert "ema: null" in text and "use_ema: false" in text and "accumulate: 1" in text
    on = config_from_dict({"train": {"ema": {"decay": 0.999}}, "test": {"use_ema": True}})
    assert (on.train.ema.decay, on.train.ema.warmup_iters) == (0.999, 2000)
    (tmp_path / "e.yaml").write_text("train:\n  ema: {}\n")
    assert load_config(tmp_path / "e.yaml", ["train.ema.warmup_iters=5"]).train.ema.warmup_iters == 5
    with pytest.raises(ValueError, match=r"train\.ema\.decay"):
        config_from_dict({"train": {"ema": {"decay": 1.0}}})
    with pytest.raises(ValueError, match=r"test\.use_ema=true needs train\.ema"):
        from resnet_det.engine import build_trainer

        cfg = config_from_dict({"test": {"use_ema": True}, "train": {"device": "cpu", "output_dir": str(tmp_path)}})
        build_trainer(cfg, tiny_detector(), ListLoader(BATCHES), progress=False)

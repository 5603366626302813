"""Trainer on a GPU: no host-device synchronisation per step, AMP, exact resume with the CUDA RNG.

Skipped on machines without CUDA (CI); run on a GPU machine with `pytest tests/engine/test_cuda.py`.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from engine_fakes import FakeDetector, FakeLoader

from detection.config import SolverConfig, load_config
from detection.engine import Checkpointer, Trainer, build_lr_scheduler, build_optimizer, build_trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SOLVER = SolverConfig(lr=0.05, max_iter=8, steps=(6,), gamma=0.5, warmup_iters=2)


@pytest.fixture(autouse=True)
def _deterministic():
    # Bitwise comparisons between runs need deterministic cuDNN kernels.
    prev = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev


def _trainer(out, *, max_iter, seed=0, make=FakeDetector, **kw) -> Trainer:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = make().cuda()
    opt = build_optimizer(model, SOLVER)
    kw = {"progress": False, "curves": False, "log_period": 1, "checkpoint_period": 100, **kw}
    return Trainer(model, opt, build_lr_scheduler(opt, SOLVER), FakeLoader(), device="cuda", max_iter=max_iter,
                   output_dir=out, **kw)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_training_steps_do_not_synchronise_with_the_host(tmp_path, amp):
    trainer = _trainer(tmp_path, max_iter=10, amp=amp, clip_grad_norm=5.0)
    trainer.run_step()  # first step: lazy CUDA/cuDNN initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.run_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(dt == (torch.bfloat16 if amp == "bf16" else torch.float32) for dt in trainer.model.autocast_dtypes)


def test_fp16_with_grad_scaler_on_cuda(tmp_path):
    trainer = _trainer(tmp_path, max_iter=6, amp="fp16", clip_grad_norm=5.0)
    result = trainer.train()
    assert trainer.scaler.is_enabled() and trainer.model.autocast_dtypes == [torch.float16] * 6
    assert all(np.isfinite(v) for v in result["losses"].values())
    assert Checkpointer(tmp_path).load("model_final")[1]["grad_scaler"]["scale"] > 0


def test_resume_on_cuda_is_exact_including_the_cuda_rng(tmp_path):
    a = _trainer(tmp_path / "a", max_iter=8)
    a.train()
    b1 = _trainer(tmp_path / "b", max_iter=4)
    b1.train()
    state = Checkpointer(tmp_path / "b").load("model_final")[1]
    assert "cuda" in state["rng"][0]  # dropout on the GPU draws from the CUDA generator
    b2 = _trainer(tmp_path / "b", max_iter=8, seed=5)
    b2.train(resume=True)

    def history(out):
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["iteration"]: (r["losses"], r["lr"]) for r in recs if r["type"] == "train"}

    ha, hb = history(tmp_path / "a"), history(tmp_path / "b")
    assert sorted(hb) == list(range(1, 9))
    for it in range(1, 9):
        assert hb[it][1] == ha[it][1]
        for k, v in ha[it][0].items():
            assert hb[it][0][k] == pytest.approx(v, abs=1e-6), (it, k)
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b2.model.state_dict()[k], v, rtol=0, atol=1e-6)


def test_build_trainer_bf16_channels_last_on_cuda(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("solver: {max_iter: 4, warmup_iters: 1, steps: [3], ims_per_batch: 2}\n")
    cfg = load_config(cfg_file, [f"train.output_dir={tmp_path / 'run'}", "train.amp=bf16", "train.channels_last=true",
                                 "train.log_period=2"])
    torch.manual_seed(0)
    trainer = build_trainer(cfg, FakeDetector(), FakeLoader(), progress=False)
    assert trainer.device.type == "cuda" and trainer.model.conv.weight.is_cuda
    result = trainer.train()
    assert result["iteration"] == 4
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["max_mem_mb"] > 0 for r in recs if r["type"] == "train")
    assert (tmp_path / "run" / "curves.png").is_file()

"""Metrics logging: metrics.jsonl lines, log.txt, curves.png, TensorBoard's optional dependency."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from engine_fakes import TinyDetector, tiny_loader

from resnet_det.config import SolverConfig
from resnet_det.engine import (
    MetricsLogger,
    Trainer,
    TrainerOptions,
    build_lr_scheduler,
    build_optimizer,
    plot_curves,
    read_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_training_writes_parseable_metrics_log_and_curves(tmp_path):
    torch.manual_seed(0)
    model = TinyDetector()  # the real tiny Faster R-CNN: the losses logged are a detector's
    cfg = SolverConfig(lr=0.05, max_iter=8, steps=(6,), warmup_iters=2)
    opt = build_optimizer(model, cfg)
    trainer = Trainer(
        model, opt, build_lr_scheduler(opt, cfg), tiny_loader(), device="cpu", max_iter=8, output_dir=tmp_path,
        options=TrainerOptions(log_period=2, eval_period=4, eval_fn=lambda m, it: {"bbox": {"AP": it / 10,
                                                                                            "AP50": it / 5}},
                               progress=True),
    )
    trainer.train()

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["iteration"] for r in train] == [2, 4, 6, 8]
    for r in train:
        assert set(r["losses"]) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
        # measured: 0 on all four records (the logged total is the sum of the logged losses)
        assert r["total_loss"] == pytest.approx(sum(r["losses"].values()), rel=1e-12)
        assert r["lr"] > 0 and r["images_per_sec"] > 0 and r["time"] >= 0 and "eta_seconds" in r
    assert train[-1]["lr"] == pytest.approx(0.005, rel=1e-12)  # after the step at 6; measured: 8.7e-19
    assert [(r["iteration"], r["metrics"]) for r in evals] == [
        (4, {"bbox/AP": 0.4, "bbox/AP50": 0.8}), (8, {"bbox/AP": 0.8, "bbox/AP50": 1.6}),
    ]

    log = (tmp_path / "log.txt").read_text()
    assert "iter 4/8" in log and "evaluation at iteration 8: bbox/AP=0.8" in log

    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000


def test_read_metrics_keeps_the_last_record_per_iteration_and_plots_nan(tmp_path):
    lines = [
        {"type": "train", "iteration": 10, "total_loss": 3.0, "losses": {"a": 3.0}, "lr": 0.1},
        {"type": "train", "iteration": 20, "total_loss": 2.0, "losses": {"a": 2.0}, "lr": 0.1},
        # A resumed run repeats iteration 20, then goes on; one value is not finite.
        {"type": "train", "iteration": 20, "total_loss": 1.5, "losses": {"a": 1.5}, "lr": 0.1},
        {"type": "train", "iteration": 30, "total_loss": "nan", "losses": {"a": "nan"}, "lr": 0.01},
        {"type": "eval", "iteration": 30, "metrics": {"segm/AP": 0.2, "bbox/AP": 0.3}},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"type": "tra')  # + a half-written line
    train, evals = read_metrics(path)
    assert [r["iteration"] for r in train] == [10, 20, 30]
    assert train[1]["total_loss"] == 1.5
    assert evals[0]["metrics"]["bbox/AP"] == 0.3
    out = plot_curves(path, tmp_path / "plots" / "curves.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_logger_on_a_non_main_process_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", max_iter=10, enabled=False)
    logger.info("hello")
    logger.log_train(1, {"a": 1.0}, lr=0.1, images_per_sec=1.0, time_s=0.0)
    logger.log_eval(1, {"AP": 1.0})
    assert logger.close() is None
    assert not (tmp_path / "run").exists()


def test_tensorboard_is_optional_with_a_clear_message(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match=r"pip install .*tensorboard.*train\.tensorboard=false"):
            MetricsLogger(tmp_path, max_iter=10, tensorboard=True, progress=False)
    else:
        logger = MetricsLogger(tmp_path, max_iter=10, tensorboard=True, progress=False)
        logger.log_train(1, {"a": 1.0}, lr=0.1, images_per_sec=1.0, time_s=0.0)
        logger.close(plot=False)
        assert any((tmp_path / "tb").iterdir())

"""tools/train.py end to end on generated data: 2 iterations of training, evaluation, every output file,
and --resume continuing from the last checkpoint."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from resnet_det_common.logs import PROJECT_LOGGERS

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/shapes/faster_rcnn_R_50_FPN.yaml")


def _tool():
    spec = importlib.util.spec_from_file_location("train_tool", REPO / "tools" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny(out: Path, iters: int) -> list[str]:
    return ["model.backbone.name=resnet18", "model.backbone.width=8", "model.fpn.channels=16", "model.roi.fc_dim=32",
            "model.input.min_size=[96]", "model.input.max_size=96", "model.input.test_min_size=96",
            "model.input.test_max_size=96",
            "data.shapes_num_train=6", "data.shapes_num_val=3", "data.shapes_image_size=96", "data.num_workers=0",
            "solver.ims_per_batch=2", f"solver.max_iter={iters}", "solver.steps=[100]", "solver.warmup_iters=1",
            "train.checkpoint_period=2", "train.log_period=1", "train.max_time_minutes=null", "train.device=cpu",
            f"train.output_dir={out}"]


def test_train_two_iterations_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    tool = _tool()
    loggers = [logging.getLogger(name) for name in ("", *PROJECT_LOGGERS)]
    before = [(lg.level, list(lg.handlers)) for lg in loggers]
    assert tool.main(["--no-progress", CONFIG, *_tiny(out, 2)]) == 0  # options before the config, too
    assert [(lg.level, list(lg.handlers)) for lg in loggers] == before, "the command leaves logging as it was"
    assert "final: bbox/AP " in capsys.readouterr().out  # the command's last line, on stdout
    # the COCO table is logged: console and log.txt
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in (out / "log.txt").read_text()
    for name in ("config.yaml", "metrics.jsonl", "log.txt", "curves.png", "model_final.safetensors", "summary.json",
                 "last_checkpoint"):
        assert (out / name).exists(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines if x["type"] == "train"] == [1, 2]
    assert any(x["type"] == "eval" and "bbox/AP" in x["metrics"] for x in lines)
    # --resume with a longer schedule continues at iteration 3, not from scratch.
    assert tool.main([CONFIG, *_tiny(out, 4), "--no-progress", "--resume"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines if x["type"] == "train"] == [1, 2, 3, 4]


def test_bad_override_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _tool().main([CONFIG, "solver.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "solver.lrr" in err and "solver.lr" in err


def test_missing_coco_root_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = _tool().main([CONFIG, f"data.root={tmp_path / 'no_coco'}", "train.device=cpu",
                         f"train.output_dir={tmp_path / 'o'}"])
    assert code == 2 and "data.root" in capsys.readouterr().err


def test_a_non_finite_loss_is_exit_3_with_one_line_naming_the_iteration_and_the_last_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import resnet_det.engine.trainer as trainer_module

    real = trainer_module._as_scalar_losses
    calls = []

    def nan_at_the_third_step(loss_dict):
        calls.append(1)
        losses = real(loss_dict)
        if len(calls) == 3:
            losses["loss_classifier"] = losses["loss_classifier"] * float("nan")
        return losses

    monkeypatch.setattr(trainer_module, "_as_scalar_losses", nan_at_the_third_step)
    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert _tool().main([CONFIG, *_tiny(out, 4), "--no-progress"]) == 3
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "Traceback" not in err and line.startswith("train.py: error: non-finite loss at iteration 3"), line
    assert "loss_classifier=nan" in line and "the last good checkpoint is 'model_0000002'" in line, line
    assert (out / "last_checkpoint").read_text().strip() == "model_0000002"

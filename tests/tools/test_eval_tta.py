"""`resnet-det eval` with test.aug (test-time augmentation) and test.use_ema on tiny real checkpoints: the config
keys (defaults, validation, --print-config), the wrapping (none by default), the command on the detection and
instance tasks, and the one-line exit 2 errors (test.aug on a task without it, test.use_ema without an EMA)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from detection.tta import DetectorWithTTA
from resnet_det.cli import main
from resnet_det.config import TTAConfig, load_config
from resnet_det.engine.launch import build_model, with_test_aug
from resnet_det.tasks.detection import DETECTION
from resnet_det.tasks.segmentation import INSTANCE, SEMANTIC
from segmentation.tta import MaskRCNNWithTTA

REPO = Path(__file__).resolve().parents[2]
DET = str(REPO / "configs/shapes/faster_rcnn_R_50_FPN.yaml")
MASK = str(REPO / "configs/shapes/mask_rcnn_R_50_FPN.yaml")
SEM = str(REPO / "configs/shapes/semantic_R_50_FPN.yaml")
TINY = ["model.backbone.name=resnet18", "model.backbone.width=8", "model.backbone.norm=GN", "model.fpn.channels=16",
        "model.roi.fc_dim=32", "model.mask.conv_dim=16", "model.mask.norm=GN", "model.input.min_size=[96]",
        "model.input.max_size=96", "model.input.test_min_size=96", "model.input.test_max_size=96",
        "data.shapes_num_train=4", "data.shapes_num_val=3", "data.shapes_image_size=96", "data.num_workers=0",
        "train.device=cpu"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path_factory.getbasetemp() / "shapes_cache"))


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _checkpoint(config: str, task, path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(load_config(config, TINY), task, 4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# -------------------------------------------------------------------------------------------- config
def test_default_is_no_augmentation_and_print_config_shows_the_keys(capsys):
    cfg = load_config(DET)
    assert cfg.test.aug == TTAConfig(flip=False, min_sizes=(), max_size=None) and not cfg.test.aug.enabled
    assert main(["eval", DET, "--print-config", "test.aug.flip=true", "test.aug.min_sizes=[224,256]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["test"]["aug"] == {"flip": True, "min_sizes": [224, 256], "max_size": None}


@pytest.mark.parametrize(("override", "message"), [
    ("test.aug.min_sizes=[0,256]", r"'test\.aug\.min_sizes' = \[0, 256\] is invalid: every size must be > 0"),
    ("test.aug.min_sizes=[256,256]", r"'test\.aug\.min_sizes' = \[256, 256\] is invalid: list each size once"),
    ("test.aug.max_size=-5", r"'test\.aug\.max_size' = -5 is invalid: must be > 0"),
    ("test.aug.flips=true", r"unknown config key 'test\.aug\.flips'; did you mean 'test\.aug\.flip'"),
    ("test.aug.min_sizes=256", r"'test\.aug\.min_sizes' got 256 \(type int\), expected tuple\[int, \.\.\.\]"),
    ("test.aug.flip=1", r"'test\.aug\.flip' got 1 \(type int\), expected bool"),
])
def test_bad_test_aug_values_are_one_line_errors_naming_the_key(override, message, capsys):
    with pytest.raises((ValueError, TypeError), match=message):
        load_config(DET, [override])
    assert main(["eval", DET, "--checkpoint", __file__, override]) == 2
    assert f"by override '{override}'" in _one_error_line(capsys)


def test_the_model_is_wrapped_only_when_an_augmentation_is_asked_for():
    for config, task, wrapper in ((DET, DETECTION, DetectorWithTTA), (MASK, INSTANCE, MaskRCNNWithTTA)):
        cfg = load_config(config, TINY)
        model = build_model(cfg, task, 4)
        assert with_test_aug(model, cfg, task) is model  # the default: the plain model, bit for bit
        for override in ("test.aug.flip=true", "test.aug.min_sizes=[64,96]", "test.aug.max_size=80"):
            wrapped = with_test_aug(model, load_config(config, [*TINY, override]), task)
            assert type(wrapped) is wrapper and wrapped.model is model
        wrapped = with_test_aug(model, load_config(config, [*TINY, "test.aug.flip=true", "test.aug.min_sizes=[64,96]",
                                                           "test.aug.max_size=120"]), task)
        assert [(a.min_size, a.max_size, a.flip) for a in wrapped.augmentations] == [
            (64, 120, False), (64, 120, True), (96, 120, False), (96, 120, True)]


# ------------------------------------------------------------------------------------------- command
@pytest.mark.parametrize(("config", "task", "iou_types"), [(DET, DETECTION, ["bbox"]),
                                                          (MASK, INSTANCE, ["bbox", "segm"])])
def test_eval_with_flip_tta_runs_and_changes_the_detections(config, task, iou_types, tmp_path, caplog):
    ckpt = _checkpoint(config, task, tmp_path / "model.safetensors")
    results = {}
    for name, extra in (("plain", []), ("tta", ["test.aug.flip=true"])):
        out = tmp_path / name
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="resnet_det.engine.launch"):
            assert main(["eval", config, "--checkpoint", str(ckpt), "--output-dir", str(out), "--no-progress", *TINY,
                         *extra]) == 0
        assert ("test-time augmentation: 2 runs per image" in caplog.text) == (name == "tta")
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        assert all(t in json.dumps(metrics) for t in iou_types)
        results[name] = json.loads((out / "eval" / "coco_instances_results.json").read_text())
    assert results["plain"] and results["tta"] and results["plain"] != results["tta"]
    if "segm" in iou_types:
        assert all("segmentation" in r for r in results["tta"])


def test_test_aug_on_a_task_without_it_is_one_line_exit_2(tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(ckpt))
    assert main(["eval", SEM, "--checkpoint", str(ckpt), *TINY, "test.aug.flip=true"]) == 2
    assert "test.aug: the 'semantic' task has no test-time augmentation" in _one_error_line(capsys)
    assert SEMANTIC.tta is None


def test_use_ema_on_a_checkpoint_without_ema_is_one_line_exit_2(tmp_path, capsys):
    ckpt = _checkpoint(DET, DETECTION, tmp_path / "model_final.safetensors")
    # A bare weights file: no trainer state beside it to read an EMA from.
    assert main(["eval", DET, "--checkpoint", str(ckpt), *TINY, "test.use_ema=true"]) == 2
    assert "test.use_ema=true" in _one_error_line(capsys)
    # A trainer state without an EMA (trained without train.ema).
    torch.save({"iteration": 1}, tmp_path / "model_final.state.pt")
    assert main(["eval", DET, "--checkpoint", str(ckpt), *TINY, "test.use_ema=true"]) == 2
    assert "holds no EMA (it was trained without train.ema)" in _one_error_line(capsys)
    # A damaged trainer state.
    (tmp_path / "model_final.state.pt").write_bytes(b"not a torch file")
    assert main(["eval", DET, "--checkpoint", str(ckpt), *TINY, "test.use_ema=true"]) == 2
    assert "test.use_ema=true: " in _one_error_line(capsys)

"""The task lookup lives at the edge (the command line); the engine is handed a Task."""

from __future__ import annotations

import pytest

from detection.config import config_from_dict
from detection.engine.launch import evaluate_checkpoint, train
from detection.tasks import DETECTION
from resnet_det.cli import _library
from segmentation.tasks import INSTANCE


def test_every_task_is_declared_once_and_found_by_name() -> None:
    assert sorted(_library.tasks()) == ["detection", "instance", "panoptic_fpn", "semantic"]
    assert _library.get_task("instance") is INSTANCE
    with pytest.raises(ValueError, match=r"model.task='boxes' is not a task; use one of \['detection'"):
        _library.get_task("boxes")


def test_the_engine_refuses_a_task_that_is_not_the_configs() -> None:
    cfg = config_from_dict({"model": {"task": "instance"}})
    with pytest.raises(ValueError, match=r"model\.task='instance' but the 'detection' task was given"):
        train(cfg, DETECTION)
    with pytest.raises(ValueError, match=r"model\.task='instance' but the 'detection' task was given"):
        evaluate_checkpoint(cfg, DETECTION, "unused.safetensors")
    with pytest.raises(TypeError, match=r"must be a detection\.engine\.task\.Task"):
        train(cfg, "instance")  # type: ignore[arg-type]

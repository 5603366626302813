"""The task lookup lives at the edge (the command line); the engine is handed a Task."""

from __future__ import annotations

import pytest

from detection.specs import TASKS, register_task
from resnet_det.cli import _library
from resnet_det.config import config_from_dict
from resnet_det.engine.launch import evaluate_checkpoint, train
from resnet_det.tasks.detection import DETECTION
from resnet_det.tasks.segmentation import INSTANCE


def test_every_registered_task_is_declared_under_its_own_name() -> None:
    assert sorted(TASKS) == ["detection", "instance", "panoptic_fpn", "semantic"]
    for name in TASKS:
        assert _library.get_task(name).name == name
    assert _library.get_task("instance") is INSTANCE
    with pytest.raises(ValueError, match=r"model.task='boxes' is not a task; use one of \['detection'"):
        _library.get_task("boxes")


def test_an_unknown_task_is_refused_when_the_config_loads_with_close_matches() -> None:
    with pytest.raises(ValueError, match=r"model\.task.*'instanse'.*did you mean 'instance'"):
        config_from_dict({"model": {"task": "instanse"}})


def test_a_task_registered_from_outside_is_valid_in_configs_and_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TASKS, "boxes2", "resnet_det.tasks.detection:DETECTION")  # undone after the test
    assert config_from_dict({"model": {"task": "boxes2"}}).model.task == "boxes2"
    # The declaration must be the task of that name: a task registered under another name is refused.
    with pytest.raises(ValueError, match="which is the task 'detection'"):
        _library.get_task("boxes2")
    with pytest.raises(ValueError, match="already declared"):
        register_task("instance", "my.tasks:OTHER")
    with pytest.raises(ValueError, match="module:ATTRIBUTE"):
        register_task("mine", "my.tasks")


def test_the_engine_refuses_a_task_that_is_not_the_configs() -> None:
    cfg = config_from_dict({"model": {"task": "instance"}})
    with pytest.raises(ValueError, match=r"model\.task='instance' but the 'detection' task was given"):
        train(cfg, DETECTION)
    with pytest.raises(ValueError, match=r"model\.task='instance' but the 'detection' task was given"):
        evaluate_checkpoint(cfg, DETECTION, "unused.safetensors")
    with pytest.raises(TypeError, match=r"must be a resnet_det\.engine\.task\.Task"):
        train(cfg, "instance")  # type: ignore[arg-type]

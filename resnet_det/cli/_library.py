"""The library calls of ``train``, ``eval`` and ``infer``, in one place, and the task lookup.

The tasks (``model.task``: detection, instance, semantic, panoptic_fpn) are named in one registry,
:data:`detection.specs.TASKS`, and declared at the edge, in ``resnet_det.tasks.detection`` and
``resnet_det.tasks.segmentation``; this module (the command line) is what imports one by name and hands it to the
engine, which never imports a task module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from resnet_det.config import Config
    from resnet_det.engine.task import Task


def get_task(name: str) -> Task:
    """The task of ``model.task``, imported from its declaration in :data:`detection.specs.TASKS`.

    Raises:
        ValueError: ``name`` is not a task (the list of valid ones), or its declaration names another task.
    """
    import importlib

    from detection.specs import TASKS

    if name not in TASKS:
        raise ValueError(f"model.task={name!r} is not a task; use one of {sorted(TASKS)}")
    module, attribute = TASKS[name].split(":")
    task = getattr(importlib.import_module(module), attribute)
    if getattr(task, "name", None) != name:
        raise ValueError(f"task {name!r} is declared as {TASKS[name]!r}, which is the task "
                         f"{getattr(task, 'name', task)!r}")
    return task


def train(cfg: Config, *, resume: bool, progress: bool) -> dict[str, Any]:
    """Trains and evaluates as ``cfg`` says (:func:`resnet_det.engine.launch.train`)."""
    from resnet_det.engine.launch import train as launch_train

    return launch_train(cfg, get_task(cfg.model.task), resume=resume, progress=progress)


def evaluate_checkpoint(cfg: Config, checkpoint: str, *, progress: bool) -> dict[str, Any]:
    """Evaluates ``checkpoint`` on the config's val split (:func:`resnet_det.engine.launch.evaluate_checkpoint`)."""
    from resnet_det.engine.launch import evaluate_checkpoint as launch_evaluate

    return launch_evaluate(cfg, get_task(cfg.model.task), checkpoint, progress=progress)


def val_dataset(cfg: Config) -> Any:
    """The config's val split, with the targets its task needs (no augmentation)."""
    from resnet_det.engine.launch import build_dataset

    return build_dataset(cfg, get_task(cfg.model.task), "val")


def read_class_names(path: str) -> tuple[list[str], dict[int, int] | None]:
    """Class names from a JSON list (background first) or a COCO annotations file.

    Returns:
        The names (background first) and, for a COCO file, the label -> category id map (else None).
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and "categories" in data:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        return ["background"] + [c["name"] for c in cats], {i + 1: c["id"] for i, c in enumerate(cats)}
    if not isinstance(data, list):
        raise ValueError(f"--class-names {path}: expected a JSON list of names or a COCO annotations file")
    return [str(n) for n in data], None


def inference_model(cfg: Config, checkpoint: str, *, num_classes: int | None = None,
                    class_names: list[str] | None = None,
                    label_to_cat_id: dict[int, int] | None = None) -> tuple[nn.Module, list[str] | None,
                                                                            dict[int, int] | None]:
    """The config's model with ``checkpoint`` loaded (ours or torchvision's), for inference.

    The number of classes comes from ``model.num_classes``, else ``num_classes``, else the class names,
    else the config's val split (which then also gives the names and the category ids).

    Returns:
        The model (on the CPU), the class names and the label -> category id map.
    """
    import dataclasses

    from detection.convert import load_detector_weights
    from resnet_det.engine.launch import build_dataset, build_model

    task = get_task(cfg.model.task)
    n = cfg.model.num_classes or num_classes or (len(class_names) - 1 if class_names else None)
    if n is None:
        val = build_dataset(cfg, task, "val")
        n, class_names, label_to_cat_id = val.num_classes, val.class_names, val.label_to_cat_id
    # The checkpoint replaces every weight: the builder must not read model.weights / backbone weights first.
    spec = cfg.model.replace(weights=None, backbone_weights=None)
    model = build_model(dataclasses.replace(cfg, model=spec), task, n)
    load_detector_weights(model, checkpoint)
    return model, class_names, label_to_cat_id

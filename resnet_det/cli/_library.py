"""The library calls of ``train``, ``eval`` and ``infer``, in one place.

Today the tasks (``model.task``: detection, instance, semantic, panoptic_fpn) are registered in
``detection.engine.launch``: the detection task by that module, the mask and semantic tasks by
``import segmentation``. Every subcommand reaches the engine through the functions below, so a move of
that registry changes this file only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from detection.config import Config


def _register_tasks() -> None:
    import segmentation  # noqa: F401  (registers the instance / semantic / panoptic tasks)


def train(cfg: Config, *, resume: bool, progress: bool) -> dict[str, Any]:
    """Trains and evaluates as ``cfg`` says (:func:`detection.engine.launch.train`)."""
    _register_tasks()
    from detection.engine.launch import train as launch_train

    return launch_train(cfg, resume=resume, progress=progress)


def evaluate_checkpoint(cfg: Config, checkpoint: str, *, progress: bool) -> dict[str, Any]:
    """Evaluates ``checkpoint`` on the config's val split (:func:`detection.engine.launch.evaluate_checkpoint`)."""
    _register_tasks()
    from detection.engine.launch import evaluate_checkpoint as launch_evaluate

    return launch_evaluate(cfg, checkpoint, progress=progress)


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
    _register_tasks()
    from detection.convert import load_detector_weights
    from detection.engine.launch import build_dataset, get_task

    n = cfg.model.num_classes or num_classes or (len(class_names) - 1 if class_names else None)
    if n is None:
        val = build_dataset(cfg, get_task(cfg.model.task), "val")
        n, class_names, label_to_cat_id = val.num_classes, val.class_names, val.label_to_cat_id
    model = get_task(cfg.model.task).build_model(cfg.model, n)
    load_detector_weights(model, checkpoint)
    return model, class_names, label_to_cat_id

"""The detection task: Faster R-CNN, evaluated by COCO box AP.

Only the command line and the tests import this module (the task layer of ARCHITECTURE.md); the
engine receives the :class:`~resnet_det.engine.task.Task` object.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detection.models import build_faster_rcnn
from detection.tta import DetectorWithTTA
from resnet_det.engine.task import EvaluatorsFn, Task
from resnet_det.evaluation import COCOEvaluator, DatasetEvaluator

__all__ = ["DETECTION", "TASKS", "coco_evaluators"]


def coco_evaluators(iou_types: Sequence[str]) -> EvaluatorsFn:
    """``build_evaluators`` of a task evaluated by COCO AP of ``iou_types`` ("bbox", "segm")."""

    def build(dataset: Any, output_dir: Path | None) -> list[DatasetEvaluator]:
        # The dataset's validated ground truth (what the model is evaluated on is what the dataset yields),
        # not the raw file again: entries the validation skipped (a bbox of strings, a string image id)
        # must not reach pycocotools.
        return [COCOEvaluator(dataset.coco, iou_types=tuple(iou_types), label_to_cat_id=dataset.label_to_cat_id,
                              output_dir=output_dir, class_names=dataset.class_names)]

    return build


DETECTION = Task("detection", build_faster_rcnn, coco_evaluators(("bbox",)), tta=DetectorWithTTA)
TASKS: tuple[Task, ...] = (DETECTION,)

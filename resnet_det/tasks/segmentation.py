"""The segmentation tasks: Mask R-CNN ("instance"), semantic FPN ("semantic"), panoptic FPN.

Only the command line and the tests import this module (the task layer of ARCHITECTURE.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnet_det.engine.task import Task
from resnet_det.evaluation import DatasetEvaluator, SemSegEvaluator
from resnet_det.tasks.detection import coco_evaluators
from segmentation.models import build_mask_rcnn, build_panoptic_fpn, build_semantic_fpn
from segmentation.tta import MaskRCNNWithTTA

__all__ = ["INSTANCE", "PANOPTIC_FPN", "SEMANTIC", "TASKS"]


def _semantic(dataset: Any, output_dir: Path | None) -> list[DatasetEvaluator]:
    return [SemSegEvaluator(len(dataset.class_names), class_names=dataset.class_names, output_dir=output_dir)]


def _panoptic(dataset: Any, output_dir: Path | None) -> list[DatasetEvaluator]:
    return [*coco_evaluators(("bbox",))(dataset, output_dir), *_semantic(dataset, output_dir)]


INSTANCE = Task("instance", build_mask_rcnn, coco_evaluators(("bbox", "segm")), with_masks=True,
                tta=MaskRCNNWithTTA)
SEMANTIC = Task("semantic", build_semantic_fpn, _semantic, with_semantic=True)
PANOPTIC_FPN = Task("panoptic_fpn", build_panoptic_fpn, _panoptic, with_semantic=True)
TASKS: tuple[Task, ...] = (INSTANCE, SEMANTIC, PANOPTIC_FPN)

"""What a task is, as the engine sees it: a model builder, its evaluators and its dataset's fields.

The engine never looks a task up by name and never imports a task module: the tasks are declared
at the edge, one module per package (``resnet_det.tasks.detection``, ``resnet_det.tasks.segmentation``), and the command
line hands the chosen :class:`Task` to :func:`resnet_det.engine.launch.train`. So the engine does not
depend on segmentation, and ``import segmentation`` loads no engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from detection.specs import ModelSpec

from ..evaluation import DatasetEvaluator

__all__ = ["EvaluatorsFn", "ModelFn", "TTAFn", "Task"]

ModelFn = Callable[[ModelSpec], nn.Module]
"""``build_model(spec) -> model`` in torchvision's calling convention; ``spec.num_classes`` is set
(foreground classes) and ``spec.weights`` is loaded by the builder."""

EvaluatorsFn = Callable[[Any, Path | None], list[DatasetEvaluator]]
"""``build_evaluators(dataset, output_dir) -> evaluators`` of the val split (the dataset gives the
annotation file, the label -> category map and the class names)."""

TTAFn = Callable[..., nn.Module]
"""``wrap(model, *, min_sizes, max_size, flip) -> model`` under test-time augmentation (``test.aug``), in the same
calling convention: ``detection.tta.DetectorWithTTA``, ``segmentation.tta.MaskRCNNWithTTA``."""


@dataclass(frozen=True)
class Task:
    """A ``model.task`` value and what it needs.

    Attributes:
        name: The ``model.task`` value.
        build_model: See :data:`ModelFn`.
        build_evaluators: See :data:`EvaluatorsFn`.
        with_masks: The dataset must provide instance masks (``targets[i]["masks"]``).
        with_semantic: The dataset must provide a semantic map (``targets[i]["sem_seg"]``).
        tta: See :data:`TTAFn`; None: the task has no test-time augmentation (``test.aug`` is refused).
    """

    name: str
    build_model: ModelFn
    build_evaluators: EvaluatorsFn
    with_masks: bool = False
    with_semantic: bool = False
    tta: TTAFn | None = None

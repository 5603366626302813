"""Evaluation: one evaluator protocol (:class:`DatasetEvaluator`), the loop that feeds it
(:func:`inference_on_dataset`), COCO bbox/segm (faster-coco-eval by default, pycocotools as the
reference: the same numbers, as fractions) and semantic segmentation (mean IoU).

The names are imported on first use (:mod:`resnet_det_common.lazy`): evaluating a results file
(:func:`evaluate_results_json`, :mod:`.coco_core`) loads neither torch nor the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resnet_det_common.lazy import lazy_exports

if TYPE_CHECKING:  # the names, for type checkers; at run time they are imported on first use
    from .coco import SHARDS_DIRNAME, COCOEvaluator, encode_masks, instances_to_coco_json
    from .coco_core import (
        BACKENDS,
        DEFAULT_BACKEND,
        IOU_TYPES,
        METRIC_NAMES,
        METRICS_FILENAME,
        RESULTS_FILENAME,
        COCOEvalWarning,
        default_backend,
        evaluate_results_json,
        format_category_table,
        load_coco_gt,
        load_results_json,
        resolve_backend,
        set_default_backend,
    )
    from .evaluator import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
    from .sem_seg import CONFUSION_MATRIX_FILENAME, SEM_SEG_METRICS_FILENAME, SemSegEvaluator

__all__ = [
    "BACKENDS",
    "CONFUSION_MATRIX_FILENAME",
    "DEFAULT_BACKEND",
    "IOU_TYPES",
    "METRICS_FILENAME",
    "METRIC_NAMES",
    "RESULTS_FILENAME",
    "SEM_SEG_METRICS_FILENAME",
    "SHARDS_DIRNAME",
    "COCOEvalWarning",
    "COCOEvaluator",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "SemSegEvaluator",
    "default_backend",
    "encode_masks",
    "evaluate_results_json",
    "format_category_table",
    "inference_on_dataset",
    "instances_to_coco_json",
    "load_coco_gt",
    "load_results_json",
    "resolve_backend",
    "set_default_backend",
]

_CORE = ("BACKENDS", "DEFAULT_BACKEND", "IOU_TYPES", "METRIC_NAMES", "METRICS_FILENAME", "RESULTS_FILENAME",
         "COCOEvalWarning", "default_backend", "evaluate_results_json", "format_category_table", "load_coco_gt",
         "load_results_json", "resolve_backend", "set_default_backend")
__getattr__, __dir__ = lazy_exports(__name__, {
    **{name: ".coco_core" for name in _CORE},
    **{name: ".coco" for name in ("SHARDS_DIRNAME", "COCOEvaluator", "encode_masks", "instances_to_coco_json")},
    **{name: ".evaluator" for name in ("DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset")},
    **{name: ".sem_seg" for name in ("CONFUSION_MATRIX_FILENAME", "SEM_SEG_METRICS_FILENAME", "SemSegEvaluator")},
})

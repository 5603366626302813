"""Evaluation: one evaluator protocol (:class:`DatasetEvaluator`), the loop that feeds it
(:func:`inference_on_dataset`), COCO bbox/segm through pycocotools (metrics identical to pycocotools,
as fractions) and semantic segmentation (mean IoU)."""

from .coco import (
    IOU_TYPES,
    METRIC_NAMES,
    METRICS_FILENAME,
    RESULTS_FILENAME,
    COCOEvaluator,
    COCOEvalWarning,
    encode_masks,
    evaluate_results_json,
    format_category_table,
    instances_to_coco_json,
    load_coco_gt,
    load_results_json,
)
from .evaluator import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
from .sem_seg import CONFUSION_MATRIX_FILENAME, SEM_SEG_METRICS_FILENAME, SemSegEvaluator

__all__ = [
    "CONFUSION_MATRIX_FILENAME",
    "IOU_TYPES",
    "METRICS_FILENAME",
    "METRIC_NAMES",
    "RESULTS_FILENAME",
    "SEM_SEG_METRICS_FILENAME",
    "COCOEvalWarning",
    "COCOEvaluator",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "SemSegEvaluator",
    "encode_masks",
    "evaluate_results_json",
    "format_category_table",
    "inference_on_dataset",
    "instances_to_coco_json",
    "load_coco_gt",
    "load_results_json",
]

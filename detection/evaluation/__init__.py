"""Evaluation: COCO bbox/segm through pycocotools (metrics identical to pycocotools, as fractions)."""

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

__all__ = [
    "IOU_TYPES",
    "METRICS_FILENAME",
    "METRIC_NAMES",
    "RESULTS_FILENAME",
    "COCOEvalWarning",
    "COCOEvaluator",
    "encode_masks",
    "evaluate_results_json",
    "format_category_table",
    "instances_to_coco_json",
    "load_coco_gt",
    "load_results_json",
]

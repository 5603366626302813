"""The ``detections`` metric: what the detector outputs, counted (``test.metrics: [detections]``).

Per evaluation: the mean number of detections per image, the fraction of images with none, and the mean
score of all detections. A model that collapses (no detections, or the maximum on every image), a score
threshold set too high or too low, show here before AP says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resnet_det_common import all_gather_object, is_main_process

from .evaluator import DatasetEvaluator
from .registry import Metric

__all__ = ["METRIC", "DetectionStatsEvaluator"]


class DetectionStatsEvaluator(DatasetEvaluator):
    """Counts the detections of every image (gathered over processes).

    ``evaluate()`` returns ``{"detections": {"per_image", "empty_images", "mean_score", "images"}}``:
    the mean detections per image, the fraction of images without any, the mean score (NaN without any
    detection) and the number of images.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._images = 0
        self._detections = 0
        self._empty = 0
        self._score_sum = 0.0

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        for i, out in enumerate(outputs):
            if "scores" not in out:
                raise ValueError(f"the detections metric reads 'scores' of each output; output {i} has "
                                 f"{sorted(out)} (a detector's outputs have boxes, scores and labels)")
            scores = out["scores"]
            n = int(scores.numel())
            self._images += 1
            self._detections += n
            self._empty += n == 0
            self._score_sum += float(scores.double().sum()) if n else 0.0

    def evaluate(self) -> dict[str, Any]:
        parts = all_gather_object((self._images, self._detections, self._empty, self._score_sum))
        if not is_main_process():
            return {}
        images, detections, empty, score_sum = (sum(p[k] for p in parts) for k in range(4))
        return {"detections": {
            "per_image": detections / images if images else float("nan"),
            "empty_images": empty / images if images else float("nan"),
            "mean_score": score_sum / detections if detections else float("nan"),
            "images": float(images),
        }}


def _build(dataset: Any, output_dir: Path | None) -> DetectionStatsEvaluator:
    return DetectionStatsEvaluator()


METRIC = Metric("detections", _build, headline=("detections/per_image", "detections/empty_images"))

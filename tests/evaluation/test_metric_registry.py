"""Metrics by name (`resnet_det.evaluation.registry`): `test.metrics` adds evaluators to a task's own; a metric is
one module and one registration line (the built-in `detections` metric is exactly that)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from resnet_det.config import Config, config_from_dict
from resnet_det.data.coco import CocoDetection
from resnet_det.engine.launch import evaluate
from resnet_det.evaluation import DatasetEvaluator, registry
from resnet_det.evaluation.registry import BUILTIN, Metric, get_metric, metric_names, register_metric
from resnet_det.evaluation.stats import DetectionStatsEvaluator
from resnet_det.tasks.detection import DETECTION


class Replay(nn.Module):
    """Answers the i-th image of the val set with `make(i, target)`."""

    def __init__(self, dataset: CocoDetection, make) -> None:
        super().__init__()
        self.items = iter([(i, dataset[i][1]) for i in range(len(dataset))])
        self.make = make

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.make(*next(self.items)) for _ in images]


def _dets(n: int, score: float = 0.5) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]] * n), "scores": torch.full((n,), score),
            "labels": torch.ones(n, dtype=torch.int64)}


def test_the_detections_metric_counts_what_the_model_outputs():
    ev = DetectionStatsEvaluator()
    ev.process([{}, {}, {}], [_dets(2, 0.25), _dets(0), _dets(4, 1.0)])
    out = ev.evaluate()["detections"]
    assert out["per_image"] == 2.0 and out["empty_images"] == pytest.approx(1 / 3) and out["images"] == 3
    assert out["mean_score"] == pytest.approx((2 * 0.25 + 4 * 1.0) / 6)
    ev.reset()
    ev.process([{}], [_dets(0)])
    empty = ev.evaluate()["detections"]
    assert empty["per_image"] == 0 and empty["empty_images"] == 1 and empty["mean_score"] != empty["mean_score"]


def test_the_detections_metric_names_an_output_without_scores():
    with pytest.raises(ValueError, match="output 0 has"):
        DetectionStatsEvaluator().process([{}], [{"sem_seg": torch.zeros(2, 2)}])


def test_test_metrics_is_checked_when_the_config_loads():
    assert config_from_dict({"test": {"metrics": ["detections"]}}).test.metrics == ["detections"]
    assert Config().test.metrics == []
    with pytest.raises(ValueError, match=r"test\.metrics.*did you mean 'detections'"):
        config_from_dict({"test": {"metrics": ["detection"]}})
    with pytest.raises(ValueError, match="twice"):
        config_from_dict({"test": {"metrics": ["detections", "detections"]}})


def test_test_metrics_runs_beside_the_tasks_evaluators(tiny_coco_src: Path, tmp_path: Path):
    ds = CocoDetection(tiny_coco_src / "images", tiny_coco_src / "annotations.json", training=False)

    def oracle(i: int, t: dict[str, Any]) -> dict[str, torch.Tensor]:
        k = 0 if i % 4 == 0 else len(t["boxes"])  # every 4th image answered with nothing
        return {"boxes": t["boxes"][:k], "labels": t["labels"][:k], "scores": torch.ones(k)}

    metrics = evaluate(Replay(ds, oracle), ds, DETECTION, device=torch.device("cpu"), output_dir=tmp_path,
                       batch_size=4, num_workers=0, progress=False, metrics=("detections",))
    counts = [0 if i % 4 == 0 else len(ds[i][1]["boxes"]) for i in range(len(ds))]
    assert metrics["detections"]["per_image"] == pytest.approx(sum(counts) / len(ds))
    assert metrics["detections"]["empty_images"] == pytest.approx(sum(c == 0 for c in counts) / len(ds))
    assert "bbox" in metrics and 0 < metrics["bbox"]["AP"] < 1


class ImagesSeen(DatasetEvaluator):
    def reset(self) -> None:
        self.n = 0

    def process(self, inputs, outputs) -> None:
        self.n += len(outputs)

    def evaluate(self) -> dict[str, Any]:
        return {"seen": {"images": float(self.n)}}


def test_a_metric_from_outside_the_library_is_one_registration(tiny_coco_src: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTERED", {})  # the registration ends with the test
    register_metric(Metric("seen", lambda dataset, folder: ImagesSeen(), headline=("seen/images",)))
    assert "seen" in metric_names() and get_metric("seen").headline == ("seen/images",)
    assert config_from_dict({"test": {"metrics": ["seen"]}}).test.metrics == ["seen"]
    ds = CocoDetection(tiny_coco_src / "images", tiny_coco_src / "annotations.json", training=False)
    out = evaluate(Replay(ds, lambda i, t: _dets(1)), ds, DETECTION, device=torch.device("cpu"), output_dir=tmp_path,
                   batch_size=4, num_workers=0, progress=False, metrics=("seen",))
    assert out["seen"]["images"] == len(ds)
    with pytest.raises(ValueError, match="built in"):
        register_metric(Metric("detections", lambda dataset, folder: ImagesSeen()))


def test_every_builtin_metric_resolves_to_its_metric():
    for name in BUILTIN:
        assert get_metric(name).name == name
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        get_metric("nope")

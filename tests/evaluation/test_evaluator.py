"""The evaluator protocol: DatasetEvaluators and the loop (inference_on_dataset) that knows no evaluator by name."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

from resnet_det.evaluation import DatasetEvaluator, DatasetEvaluators, SemSegEvaluator, inference_on_dataset
from resnet_det_common import logging_scope


class Recorder(DatasetEvaluator):
    """Keeps what it was given; reports `{key: number of images}`."""

    def __init__(self, key: str = "count") -> None:
        self.key = key
        self.calls: list[str] = []
        self.seen: list[tuple[list[Any], list[dict[str, Any]]]] = []

    def reset(self) -> None:
        self.calls.append("reset")
        self.seen = []

    def process(self, inputs, outputs) -> None:
        self.calls.append("process")
        self.seen.append((list(inputs), list(outputs)))

    def evaluate(self) -> dict[str, Any]:
        self.calls.append("evaluate")
        return {self.key: sum(len(i) for i, _ in self.seen)}


class HalfPrecisionModel(nn.Module):
    """Answers in float16/bfloat16 (as under autocast) and records its mode and autocast state."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.modes: list[bool] = []
        self.autocast: list[bool] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.modes.append(self.training)
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return [{"scores": (img.mean() * self.scale).reshape(1).to(torch.bfloat16),
                 "labels": torch.tensor([1]), "sem_seg": torch.zeros(img.shape[-2:], dtype=torch.int64)}
                for img in images]


def _loader(n_batches: int = 3, batch: int = 2) -> list[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
    return [([torch.rand(3, 4, 5) for _ in range(batch)],
             [{"image_id": b * batch + i, "sem_seg": torch.zeros(4, 5, dtype=torch.int64)} for i in range(batch)])
            for b in range(n_batches)]


def test_the_list_evaluator_calls_each_in_turn_and_merges_their_keys():
    a, b = Recorder("a"), Recorder("b")
    both = DatasetEvaluators([a, b])
    both.reset()
    both.process([{"image_id": 1}], [{"x": 1}])
    assert both.evaluate() == {"a": 1, "b": 1}
    assert a.calls == b.calls == ["reset", "process", "evaluate"]
    assert DatasetEvaluators([]).evaluate() == {}


def test_two_evaluators_reporting_the_same_key_are_refused():
    both = DatasetEvaluators([Recorder("bbox"), Recorder("bbox")])
    with pytest.raises(ValueError, match=r"Recorder and Recorder both report 'bbox'"):
        both.evaluate()
    with pytest.raises(TypeError, match="item 1 is a function, not a DatasetEvaluator"):
        DatasetEvaluators([Recorder(), lambda: None])


def test_inference_feeds_targets_and_cpu_float32_outputs_and_restores_the_mode():
    model = HalfPrecisionModel().train()
    rec = Recorder()
    rec.seen = [([1], [])]  # stale state: the loop resets the evaluator first
    results = inference_on_dataset(model, _loader(), rec, device="cpu", amp="bf16", progress=False)
    assert results == {"count": 6}
    assert rec.calls == ["reset", "process", "process", "process", "evaluate"]
    assert [t["image_id"] for inputs, _ in rec.seen for t in inputs] == list(range(6))
    out = rec.seen[0][1][0]
    assert out["scores"].dtype == torch.float32 and out["labels"].dtype == torch.int64
    assert model.modes == [False] * 3 and model.autocast == [True] * 3
    assert model.training  # given back in the mode it had


def test_inference_restores_the_mode_after_an_error_and_checks_the_model_answer():
    class Wrong(HalfPrecisionModel):
        def forward(self, images):
            return super().forward(images)[:1]

    model = Wrong().train()
    with pytest.raises(ValueError, match="returned 1 outputs for 2 images"):
        inference_on_dataset(model, _loader(), Recorder(), device="cpu", progress=False)
    assert model.training


def test_one_loop_for_every_evaluator_with_a_semantic_and_a_custom_one(tmp_path):
    sem = SemSegEvaluator(2, output_dir=tmp_path)
    results = inference_on_dataset(HalfPrecisionModel(), _loader(), DatasetEvaluators([sem, Recorder()]),
                                   device="cpu", progress=False)
    assert results["count"] == 6 and results["sem_seg"]["pAcc"] == 1.0


def test_tables_and_the_inference_summary_reach_the_run_log(tmp_path):
    sem = SemSegEvaluator(2, class_names=["background", "thing"])
    with logging_scope(tmp_path):
        inference_on_dataset(HalfPrecisionModel(), _loader(), sem, device="cpu", progress=True)
    log = (tmp_path / "log.txt").read_text()
    assert "inference on 6 images" in log
    assert "| background" in log and "mIoU=" in log  # the table, through logging


def test_the_progress_lines_without_a_terminal_are_log_records(monkeypatch, caplog):
    import resnet_det.evaluation.evaluator as evaluator_module

    monkeypatch.setattr(evaluator_module, "LOG_EVERY_SECONDS", -1.0)  # a line for every batch
    with caplog.at_level(logging.INFO, logger="resnet_det.evaluation"):
        inference_on_dataset(HalfPrecisionModel(), _loader(), Recorder(), device="cpu", progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "resnet_det.evaluation.evaluator"]
    assert [x.split(",")[0] for x in lines[:3]] == ["inference: batch 1/3", "inference: batch 2/3",
                                                     "inference: batch 3/3"]

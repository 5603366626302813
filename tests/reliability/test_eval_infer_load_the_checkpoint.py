"""``resnet-det eval --checkpoint`` and ``resnet-det infer --checkpoint`` run the weights they are given.

The proof is the training run's own final evaluation: evaluating its ``model_final.safetensors`` again gives
the metrics recorded in its ``metrics.jsonl`` and the very detections of its ``eval/coco_instances_results.json``;
``infer`` on the same val images gives those detections too. A control evaluates another checkpoint of the
same run (after iteration 1): its detections differ, so these comparisons would catch a model that kept its
random initialisation or loaded the wrong file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import faults
import pytest
import torch

from resnet_det.cli import main

Detections = dict[int, list[dict[str, Any]]]


def _by_image(results: list[dict[str, Any]]) -> Detections:
    out: Detections = defaultdict(list)
    for r in results:
        out[int(r["image_id"])].append(r)
    for dets in out.values():
        dets.sort(key=lambda r: (-r["score"], r["category_id"], r["bbox"]))
    return dict(out)


def _assert_same_detections(got: Detections, want: Detections) -> None:
    assert sorted(got) == sorted(want)
    for image, dets in want.items():
        assert len(got[image]) == len(dets), image
        mine, theirs = got[image], dets
        assert [r["category_id"] for r in mine] == [r["category_id"] for r in theirs], image
        # measured: 0 on scores and boxes of all 8 images, eval and infer (the same weights, images and CPU kernels);
        # 1e-6 and 1e-4 px leave room for thread-count-dependent sums
        torch.testing.assert_close(torch.tensor([r["score"] for r in mine]), torch.tensor([r["score"] for r in theirs]),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor([r["bbox"] for r in mine]), torch.tensor([r["bbox"] for r in theirs]),
                                   rtol=0, atol=1e-4)


def _final_eval_record(run: Path) -> dict[str, float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (final,) = [r for r in records if r["type"] == "eval"]
    return final["metrics"]


@pytest.fixture
def cli(shapes_env, monkeypatch):
    monkeypatch.setenv("RESNET_DET_CACHE", shapes_env["RESNET_DET_CACHE"])

    def run(*argv: str) -> None:
        assert main(list(argv)) == 0

    return run


def _evaluate(cli, run: Path, checkpoint: str, out: Path) -> tuple[dict[str, Any], Detections]:
    cli("eval", faults.CONFIG, "--checkpoint", str(run / checkpoint), *faults.TINY, "--output-dir", str(out),
        "--no-progress")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    return metrics, _by_image(json.loads((out / "eval" / "coco_instances_results.json").read_text()))


def test_eval_of_a_checkpoint_gives_the_training_runs_own_final_evaluation(cli, reference_run, tmp_path):
    metrics, detections = _evaluate(cli, reference_run, "model_final.safetensors", tmp_path / "final")
    recorded = _final_eval_record(reference_run)
    again = {f"bbox/{k}": v for k, v in metrics["bbox"]["summary"].items()}
    again.update({f"bbox/AP-{name}": v for name, v in metrics["bbox"]["per_category_AP"].items()})
    assert again.keys() == recorded.keys(), (sorted(again), sorted(recorded))
    # measured: 0 on all 16 metrics
    assert all(recorded[k] == pytest.approx(v, abs=1e-14) for k, v in again.items()), (again, recorded)
    trained = _by_image(json.loads((reference_run / "eval" / "coco_instances_results.json").read_text()))
    assert sum(len(d) for d in trained.values()) > 100
    _assert_same_detections(detections, trained)

    # Control: the same command on another checkpoint of the run gives other detections.
    _, early = _evaluate(cli, reference_run, "model_0000001.safetensors", tmp_path / "early")
    with pytest.raises(AssertionError):
        _assert_same_detections(early, trained)


def test_infer_with_a_checkpoint_gives_the_training_runs_detections(cli, reference_run, tmp_path, shapes_env):
    val_images = next(Path(shapes_env["RESNET_DET_CACHE"]).glob("shapes/shapes-*/val"))
    out = tmp_path / "pred"
    # No class names and no num_classes: infer takes them (and the category ids) from the config's val split.
    cli("infer", faults.CONFIG, *faults.TINY, "--checkpoint", str(reference_run / "model_final.safetensors"),
        "--input", str(val_images), "--output", str(out), "--batch-size", "4", "--no-progress")
    got = _by_image(json.loads((out / "results.json").read_text()))
    trained = _by_image(json.loads((reference_run / "eval" / "coco_instances_results.json").read_text()))
    _assert_same_detections(got, trained)

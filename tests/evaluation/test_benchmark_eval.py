"""``resnet-det benchmark-eval`` at a tiny size (no timing is asserted: the figures are the benchmark's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util

from resnet_det.cli import main
from resnet_det.studies.eval_bench import generate_eval_set, rectangle_rle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def test_rectangle_rle_is_what_pycocotools_encodes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(3, 40, 2))
        x0, y0 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
        x1, y1 = int(rng.integers(x0 + 1, w)), int(rng.integers(y0 + 1, h))
        m = np.zeros((h, w), np.uint8)
        m[y0:y1, x0:x1] = 1
        assert rectangle_rle(x0, y0, x1, y1, h, w) == mask_util.encode(np.asfortranarray(m))["counts"].decode()


def test_generated_set_is_seeded_and_shaped(tmp_path):
    a = generate_eval_set(tmp_path / "a", images=12, instances=40, per_image=6, seed=3)
    b = generate_eval_set(tmp_path / "b", images=12, instances=40, per_image=6, seed=3)
    for key in ("bbox", "segm"):
        ra, rb = (json.loads(Path(x["results"][key]).read_text()) for x in (a, b))
        assert ra == rb and len(ra) == 72
    gt = json.loads(Path(a["annotations"]).read_text())
    assert len(gt["images"]) == 12 and len(gt["annotations"]) == 40 and len(gt["categories"]) == 80
    bbox = json.loads(Path(a["results"]["bbox"]).read_text())
    segm = json.loads(Path(a["results"]["segm"]).read_text())
    sizes = {im["id"]: [im["height"], im["width"]] for im in gt["images"]}
    for b, s in zip(bbox, segm):  # the same detections: the mask is the box
        assert s["segmentation"]["size"] == sizes[s["image_id"]]
        rle = {"size": s["segmentation"]["size"], "counts": s["segmentation"]["counts"].encode()}
        assert mask_util.toBbox(rle).tolist() == b["bbox"]


@pytest.mark.slow
def test_benchmark_eval_tiny_run_writes_the_record(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["benchmark-eval", "--images", "10", "--instances", "40", "--per-image", "8", "--repeats", "1",
               "--iou-types", "bbox", "segm", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ours" in printed and "faster-coco-eval" in printed and "pycocotools" in printed
    record = json.loads((out / "eval_benchmark.json").read_text())
    txt = (out / "eval_benchmark.txt").read_text().splitlines()
    assert txt[0].startswith("resnet-det benchmark-eval --images 10 ") and txt[0].endswith(f"--out {out}")
    assert record["command"] == txt[0].split(" ")
    assert {"date", "versions", "machine", "load_average_before", "load_average_after"} <= set(record)
    assert record["versions"]["faster-coco-eval"] and record["versions"]["pycocotools"]
    for iou_type in ("bbox", "segm"):
        rows = [r for r in record["runs"] if r["iou_type"] == iou_type]
        assert sorted(r["mode"] for r in rows) == ["faster-coco-eval", "ours", "pycocotools"]
        # the three agree on the numbers (pycocotools' precision has an eps; measured: 1.1e-16 at most)
        ref = next(r for r in rows if r["mode"] == "pycocotools")["stats"]
        for r in rows:
            np.testing.assert_allclose(r["stats"], ref, rtol=0, atol=1e-14)
            assert r["seconds"] > 0 and r["peak_rss_bytes"] > 0
        assert next(r for r in rows if r["mode"] == "ours")["pr_curve"]
        summary = record["summary"][iou_type]
        assert set(summary) == {"ours", "pycocotools", "faster-coco-eval"}
        assert summary["ours"]["time_x_faster-coco-eval"] > 0

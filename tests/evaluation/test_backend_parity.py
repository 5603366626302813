"""faster-coco-eval (the default backend) against pycocotools (the reference): the same numbers.

Compared: the 12 stats, per-category AP, and the full ``eval["precision"]`` [T, R, K, A, M] and
``eval["recall"]`` [T, K, A, M] arrays, against plain pycocotools (its README's calls) on tiny COCO and
on randomised sets. Recall is equal bit for bit. Precision is not: pycocotools computes
``tp / (tp + fp + np.spacing(1))``, faster-coco-eval ``tp / (tp + fp)``; the measured difference is at most
2.2e-16 (one ulp of 1.0; e.g. a precision of 1 is 1 - 2.2e-16 in pycocotools), so 1e-12 is the bound
asserted. With ``backend="pycocotools"`` everything is equal bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import evalhelpers as H
import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from resnet_det.evaluation import METRIC_NAMES, COCOEvaluator, COCOEvalWarning, coco_core, evaluate_results_json

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

PRECISION_TOL = 1e-14  # measured max |difference|: 2.2e-16 (tp / (tp + fp) vs tp / (tp + fp + eps))
BACKENDS = ("faster-coco-eval", "pycocotools")


def _reference(gt_path: Path, results: list[dict], iou_type: str) -> COCOeval:
    gt = H.quiet_coco(gt_path)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(json.loads(json.dumps(results))), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _ours(gt_path: Path, results: list[dict], iou_type: str, backend: str, tmp_path: Path) -> tuple[dict, dict]:
    path = tmp_path / f"res_{iou_type}_{backend}.json"
    path.write_text(json.dumps(results))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", COCOEvalWarning)  # "not counted" (> maxDets) is expected here
        metrics = evaluate_results_json(path, gt_path, iou_types=(iou_type,), backend=backend,
                                        output_dir=tmp_path / f"out_{iou_type}_{backend}")
    # the arrays: run the same evaluation again through the library, keeping the COCOeval object
    gt = coco_core.load_coco_gt(gt_path, iou_types=(iou_type,), backend=backend)
    res = coco_core.load_results_json(path)
    cols = coco_core._validate_results(res, gt, (iou_type,), "results")
    _, evals = coco_core.evaluate_prepared(gt, res, cols.image_id, (iou_type,), img_ids=None, names={},
                                           output_dir=None, backend=backend, progress=False)
    return metrics[iou_type], evals[iou_type].eval


def _compare(gt_path: Path, results: list[dict], iou_type: str, tmp_path: Path) -> np.ndarray:
    ref = _reference(gt_path, results, iou_type)
    names = {c["id"]: c["name"] for c in ref.cocoGt.dataset["categories"]}
    for backend in BACKENDS:
        metrics, ev = _ours(gt_path, results, iou_type, backend, tmp_path)
        # measured: stats, precision and per-class AP within 2.2e-16 of pycocotools (PRECISION_TOL)
        tol = PRECISION_TOL if backend == "faster-coco-eval" else 0.0
        stats = np.array([metrics[k] for k in METRIC_NAMES])
        np.testing.assert_allclose(stats, ref.stats, rtol=0, atol=tol, err_msg=backend)
        assert ev["precision"].shape == ref.eval["precision"].shape
        np.testing.assert_allclose(ev["precision"], ref.eval["precision"], rtol=0, atol=tol, err_msg=backend)
        np.testing.assert_array_equal(ev["recall"], ref.eval["recall"], err_msg=backend)
        expected = {}
        for k, cat in enumerate(ref.params.catIds):
            p = ref.eval["precision"][:, :, k, 0, -1]
            if (p > -1).any():
                expected[f"AP-{names[cat]}"] = float(np.mean(p[p > -1]))
        got = {k: v for k, v in metrics.items() if k.startswith("AP-")}
        assert got.keys() == expected.keys()
        # measured: within 1.1e-16 (PRECISION_TOL)
        np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=0, atol=tol)
    return np.asarray(ref.stats)


# ---------------------------------------------------------------------------------------------- tiny COCO
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_tiny_coco_both_backends_equal_pycocotools(gt_path, gt, tmp_path, iou_type):
    ids, outs = H.synthetic_outputs(gt, seed=3, with_masks=iou_type == "segm")
    l2c, _ = H.label_maps(gt)
    results = H.direct_results(ids, outs, l2c, iou_type)  # RLE masks; ground truth: polygons and a crowd RLE
    assert any(a["iscrowd"] for a in gt.dataset["annotations"])
    stats = _compare(gt_path, results, iou_type, tmp_path)
    assert 0.1 < stats[0] < 0.9


# ---------------------------------------------------------------------------------------------- random sets
def _rect_rle(x0: int, y0: int, x1: int, y1: int, h: int, w: int) -> dict:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def _random_set(seed: int, tmp_path: Path) -> tuple[Path, list[dict], list[dict]]:
    """Ground truth with crowds, empty images and categories without any instance; detections with ties in
    score, more than 100 per image and category on some pairs, on empty images and on missing categories."""
    rng = np.random.default_rng(seed)
    n_img, cats = 12, [1, 2, 3, 5, 8, 13]  # category 13 never gets ground truth
    images = [{"id": 100 + i, "height": int(rng.integers(40, 90)), "width": int(rng.integers(40, 90))}
              for i in range(n_img)]
    anns, aid = [], 1
    for img in images[:-3]:  # the last three images have no ground truth
        h, w = img["height"], img["width"]
        for _ in range(int(rng.integers(1, 9))):
            x0, y0 = int(rng.integers(0, w - 6)), int(rng.integers(0, h - 6))
            x1, y1 = int(rng.integers(x0 + 2, w)), int(rng.integers(y0 + 2, h))
            crowd = bool(rng.random() < 0.15)
            cat = int(rng.choice(cats[:-1]))
            seg = (_rect_rle(x0, y0, x1, y1, h, w) if crowd else  # crowds as RLE, the rest as polygons
                   [[x0, y0, x1, y0 + rng.uniform(0, 2), x1, y1, x0 + rng.uniform(0, 2), y1]])
            anns.append({"id": aid, "image_id": img["id"], "category_id": cat, "iscrowd": int(crowd),
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)),
                         "segmentation": seg})
            aid += 1
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in cats]}
    gt_path = tmp_path / f"gt_{seed}.json"
    gt_path.write_text(json.dumps(gt))
    bbox, segm = [], []
    for img in images:
        h, w = img["height"], img["width"]
        own = [a for a in anns if a["image_id"] == img["id"]]
        n = int(rng.integers(0, 40)) if img is not images[0] else 130  # image 0: > 100 per category
        for k in range(n):
            if own and rng.random() < 0.6:
                a = own[int(rng.integers(len(own)))]
                x, y, bw, bh = a["bbox"]
                x0 = int(np.clip(x + rng.integers(-2, 3), 0, w - 2))
                y0 = int(np.clip(y + rng.integers(-2, 3), 0, h - 2))
                x1 = int(np.clip(x0 + bw + rng.integers(-2, 3), x0 + 1, w))
                y1 = int(np.clip(y0 + bh + rng.integers(-2, 3), y0 + 1, h))
                cat = a["category_id"] if rng.random() < 0.8 else int(rng.choice(cats))
            else:
                x0, y0 = int(rng.integers(0, w - 3)), int(rng.integers(0, h - 3))
                x1, y1 = int(rng.integers(x0 + 1, w)), int(rng.integers(y0 + 1, h))
                cat = int(rng.choice(cats))
            if img is images[0] and k < 120:
                cat = cats[0]
            score = float(np.round(rng.random(), 1))  # one decimal: many ties
            bbox.append({"image_id": img["id"], "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "score": score})
            segm.append({"image_id": img["id"], "category_id": cat, "score": score,
                         "segmentation": _rect_rle(x0, y0, x1, y1, h, w)})
    return gt_path, bbox, segm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomised_sets_both_backends_equal_pycocotools(tmp_path, seed):
    gt_path, bbox, segm = _random_set(seed, tmp_path)
    pairs = {}
    for r in bbox:
        pairs[r["image_id"], r["category_id"]] = pairs.get((r["image_id"], r["category_id"]), 0) + 1
    assert max(pairs.values()) > 100  # maxDets cuts in
    assert len({r["score"] for r in bbox}) <= 11 < len(bbox)  # ties
    for iou_type, results in (("bbox", bbox), ("segm", segm)):
        stats = _compare(gt_path, results, iou_type, tmp_path)
        assert 0.0 < stats[0] < 1.0


def test_precision_differs_only_in_the_last_bits(gt_path, gt, tmp_path):
    """Why the tolerance: a single true positive has precision 1 - 2.2e-16 in pycocotools, exactly 1 here."""
    ids, outs = H.perfect_outputs(gt)
    l2c, _ = H.label_maps(gt)
    results = H.direct_results(ids, outs, l2c, "bbox")
    ref = _reference(gt_path, results, "bbox")
    _, ev = _ours(gt_path, results, "bbox", "faster-coco-eval", tmp_path)
    diff = np.abs(ev["precision"] - ref.eval["precision"])
    assert 0 < diff.max() <= 2.3e-16  # measured: 2.2e-16, one ulp below 1: the bound is that figure
    where = diff > 0  # e.g. a category with one object: 1 / (1 + eps) in pycocotools, 1 / 1 here
    assert (ev["precision"][where] == 1.0).all() and (ref.eval["precision"][where] == 1.0 - np.spacing(1.0)).all()


# ---------------------------------------------------------------------------------------------- fallback
def test_missing_faster_coco_eval_falls_back_to_pycocotools_with_one_warning(gt_path, gt, monkeypatch, tmp_path):
    def missing():
        raise ImportError("No module named 'faster_coco_eval'")

    monkeypatch.setattr(coco_core, "_import_faster_coco_eval", missing)
    monkeypatch.setitem(coco_core._state, "fallback_warned", False)
    ids, outs = H.synthetic_outputs(gt, seed=0)
    l2c, _ = H.label_maps(gt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = COCOEvaluator(gt_path, label_to_cat_id=l2c)
        first.process(ids, outs)
        metrics = first.evaluate()
        second = COCOEvaluator(gt_path, label_to_cat_id=l2c)  # no second warning in the same process
    fallback = [w for w in caught if "falls back to pycocotools" in str(w.message)]
    assert len(fallback) == 1 and issubclass(fallback[0].category, COCOEvalWarning)
    assert first.backend == second.backend == "pycocotools"
    assert isinstance(first.coco_gt, COCO)
    stats, _, _ = H.pycocotools_direct(gt_path, H.direct_results(ids, outs, l2c, "bbox"), "bbox")
    np.testing.assert_array_equal([metrics["bbox"][k] for k in METRIC_NAMES], stats)  # bit for bit
    with pytest.raises(ValueError, match="unknown COCO evaluation backend 'detectron2'"):
        COCOEvaluator(gt_path, backend="detectron2")


# ---------------------------------------------------------------------------------------------- pitfalls
@pytest.mark.parametrize("backend", BACKENDS)
def test_pitfalls_are_handled_with_both_backends(tiny_coco, backend):
    path = tiny_coco / "annotations.json"
    gt = H.quiet_coco(path)
    ids, outs = H.perfect_outputs(gt)  # from the intact file: duplicate ids would fool pycocotools' index here too
    l2c, _ = H.label_maps(gt)
    data = json.loads(path.read_text())
    data["annotations"][0]["id"] = 0  # id 0 ...
    data["annotations"][2]["id"] = data["annotations"][1]["id"]  # ... and a duplicate id
    path.write_text(json.dumps(data))
    with pytest.warns(COCOEvalWarning, match="id 0.*duplicate"):
        ev = COCOEvaluator(path, label_to_cat_id=l2c, backend=backend)
    ev.process(ids, outs)
    # measured: 0 (pycocotools' eps could make it 1 - 2e-16)
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx(1.0, abs=1e-14)  # every match counted

    ev.reset()  # empty results: all zeros and a warning, no IndexError from loadRes
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    ev.process(ids, [empty] * len(ids))
    with pytest.warns(COCOEvalWarning, match="no detections"):
        assert [ev.evaluate()["bbox"][k] for k in METRIC_NAMES] == [0.0] * 12

    res = [{"image_id": 987654321, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]
    (tiny_coco / "r.json").write_text(json.dumps(res))
    with pytest.raises(ValueError, match=r"image ids \[987654321\] that are not in the annotations"):
        evaluate_results_json(tiny_coco / "r.json", path, backend=backend)


# ---------------------------------------------------------------------------------------------- validation
def _entry(**kw):
    return {"image_id": 5802, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5, **kw}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_entry(image_id="5802"), r"entry #1 has image_id '5802'; ids must be integers"),
        (_entry(category_id=True), r"entry #1 has category_id True; ids must be integers"),
        ({"image_id": 5802, "category_id": 1, "bbox": [1, 2, 3, 4]}, r"entry #1 has no 'score'"),
        (_entry(score=None), r"entry #1 \(image 5802\) has score None"),
        (_entry(bbox=[1, 2, 3]), r"entry #1 \(image 5802\) has bbox \[1, 2, 3\]"),
        (_entry(bbox=[1, 2, "3", 4]), r"entry #1 \(image 5802\) has bbox \[1, 2, '3', 4\]"),
        (_entry(bbox=[1, 2, -3, 4]), r"entry #1 \(image 5802\) has bbox \[1, 2, -3, 4\] with a negative width"),
        (_entry(category_id=12), r"category ids \[12\] that are not in the annotations"),
    ],
)
def test_vectorised_validation_names_the_entry(gt_path, tmp_path, bad, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([_entry(), bad, _entry()]))
    with pytest.raises(ValueError, match=message):
        evaluate_results_json(path, gt_path)


def test_segm_validation_and_uncompressed_rle(gt_path, gt, tmp_path):
    ids, outs = H.synthetic_outputs(gt, seed=1, with_masks=True)
    l2c, _ = H.label_maps(gt)
    results = H.direct_results(ids, outs, l2c, "segm")
    compressed = evaluate_results_json(results, gt_path, backend="faster-coco-eval")
    # the same masks as uncompressed RLE (counts as a list of run lengths) give the same metrics
    uncompressed = []
    for r in results[:]:
        m = mask_util.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()})
        flat = m.flatten(order="F")
        change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        counts = np.diff(np.concatenate([[0], change])).tolist()
        uncompressed.append({**r, "segmentation": {"size": r["segmentation"]["size"], "counts": counts}})
    assert evaluate_results_json(uncompressed, gt_path, backend="faster-coco-eval") == compressed
    bad = [dict(results[0], segmentation={"size": [7, 9], "counts": "abc"})]
    with pytest.raises(ValueError, match=r"entry #0: mask size \[7, 9\] for image"):
        evaluate_results_json(bad, gt_path)
    with pytest.raises(ValueError, match=r"entry #0 \(image \d+\) has no RLE 'segmentation'"):
        evaluate_results_json([dict(results[0], segmentation=[[1, 2, 3, 4, 5, 6]])], gt_path, iou_types=["segm"])


# ---------------------------------------------------------------------------------------------- no torch, logs
def test_results_mode_imports_no_torch(gt_path, synthetic_results_file):
    code = ("import sys; from resnet_det.cli import main; "
            f"rc = main(['eval', '--results', {str(synthetic_results_file)!r}, '--annotations', {str(gt_path)!r}]); "
            "assert rc == 0, rc; bad = [m for m in ('torch', 'torchvision', 'detection.models') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(H.table_lines(proc.stdout)) == 12
    assert "COCO evaluation (bbox) stages: load" in proc.stderr and "accumulate" in proc.stderr


def test_progress_lines_and_stage_times_are_logged(gt_path, synthetic_results_file, tmp_path, monkeypatch):
    from resnet_det_common import logging_scope

    monkeypatch.setattr(coco_core, "LOG_EVERY_S", 0.0)  # every pair logs: the line a long evaluation prints
    with logging_scope(tmp_path):
        evaluate_results_json(synthetic_results_file, gt_path, output_dir=tmp_path / "out")
    log = (tmp_path / "log.txt").read_text()
    assert "COCO evaluate (bbox, faster-coco-eval): " in log and "image-category pairs" in log
    line = next(ln for ln in log.splitlines() if "stages:" in ln)
    for stage in ("load", "validate", "prepare", "evaluate", "accumulate", "report"):
        assert f" {stage} " in line
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["backend"] == "faster-coco-eval"
    assert set(report["timings_s"]["bbox"]) == {"load", "validate", "prepare", "evaluate", "accumulate", "report"}


@pytest.fixture
def synthetic_results_file(gt, tmp_path):
    ids, outs = H.synthetic_outputs(gt, seed=0)
    l2c, _ = H.label_maps(gt)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(H.direct_results(ids, outs, l2c, "bbox")))
    return path


def test_default_backend_is_faster_coco_eval_and_can_be_set(gt_path):
    from resnet_det.evaluation import DEFAULT_BACKEND, default_backend, set_default_backend

    assert DEFAULT_BACKEND == default_backend() == "faster-coco-eval"
    assert COCOEvaluator(gt_path).backend == "faster-coco-eval"
    set_default_backend("pycocotools")  # what `resnet-det eval CONFIG --checkpoint W --backend pycocotools` does
    try:
        ev = COCOEvaluator(gt_path)
        assert ev.backend == "pycocotools" and isinstance(ev.coco_gt, COCO)
    finally:
        set_default_backend(None)
    assert default_backend() == "faster-coco-eval"
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        set_default_backend("fast")

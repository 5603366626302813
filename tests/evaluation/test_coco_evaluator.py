"""COCOEvaluator / evaluate_results_json: the numbers are pycocotools' own, and the pitfalls are handled."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import evalhelpers as H
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from resnet_det.evaluation import (
    METRIC_NAMES,
    COCOEvaluator,
    COCOEvalWarning,
    encode_masks,
    evaluate_results_json,
    instances_to_coco_json,
)

# pycocotools' mask.decode (used here by COCO.annToMask to make test masks) warns under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def _stats(metrics: dict[str, float]) -> np.ndarray:
    return np.array([metrics[k] for k in METRIC_NAMES])


# faster-coco-eval divides tp / (tp + fp) where pycocotools divides by (tp + fp + eps): the stats differ in
# the last bits (measured here: at most 1.1e-16); pycocotools as the backend gives pycocotools' bits.
TOL = {"pycocotools": 0.0, "faster-coco-eval": 1e-14}


def _same(actual, desired, backend: str) -> None:
    np.testing.assert_allclose(np.asarray(actual, float), np.asarray(desired, float), rtol=0, atol=TOL[backend])


@pytest.fixture(scope="module")
def synthetic(tiny_coco_src: Path):
    gt = H.quiet_coco(tiny_coco_src / "annotations.json")
    ids, outs = H.synthetic_outputs(gt, seed=0, with_masks=True)
    return ids, outs, H.label_maps(gt)[0]


@pytest.mark.parametrize("backend", ["faster-coco-eval", "pycocotools"])
def test_bbox_and_segm_stats_and_table_identical_to_pycocotools(gt_path, synthetic, tmp_path, capsys, backend):
    ids, outs, l2c = synthetic
    ev = COCOEvaluator(gt_path, iou_types=("bbox", "segm"), label_to_cat_id=l2c, output_dir=tmp_path,
                       backend=backend)
    assert ev.backend == backend
    for i in range(0, len(ids), 3):  # batches of 3
        ev.process(ids[i : i + 3], outs[i : i + 3])
    metrics = ev.evaluate()
    printed = capsys.readouterr().out

    ours_lines = H.table_lines(printed)
    assert len(ours_lines) == 24
    for k, iou_type in enumerate(("bbox", "segm")):
        stats, lines, direct = H.pycocotools_direct(
            gt_path, H.direct_results(ids, outs, l2c, iou_type), iou_type
        )
        assert 0.1 < stats[0] < 0.9  # a real, imperfect result: the comparison is not vacuous
        _same(_stats(metrics[iou_type]), stats, backend)
        _same(ev.stats[iou_type], stats, backend)
        assert ours_lines[12 * k : 12 * (k + 1)] == lines
        # per-category AP: detectron2's rule on pycocotools' precision array
        prec = direct.eval["precision"]
        names = {c["id"]: c["name"] for c in direct.cocoGt.dataset["categories"]}
        expected = {}
        for kk, cat in enumerate(direct.params.catIds):
            p = prec[:, :, kk, 0, -1]
            if (p > -1).any():
                expected[f"AP-{names[cat]}"] = float(np.mean(p[p > -1]))
        got = {k: v for k, v in metrics[iou_type].items() if k.startswith("AP-")}
        assert got.keys() == expected.keys() and len(got) == 37
        _same(list(got.values()), list(expected.values()), backend)
    # the segm table really differs from the bbox one (the two evaluations are independent)
    assert ours_lines[:12] != ours_lines[12:]
    assert "| category" in printed and "| person" in printed


@pytest.mark.parametrize("backend", ["faster-coco-eval", "pycocotools"])
def test_results_json_path_identical_to_pycocotools_and_roundtrips(gt_path, synthetic, tmp_path, backend):
    ids, outs, l2c = synthetic
    bbox_results = H.direct_results(ids, outs, l2c, "bbox")
    res_file = tmp_path / "res.json"
    res_file.write_text(json.dumps(bbox_results))
    metrics = evaluate_results_json(res_file, gt_path, backend=backend)  # iou type inferred: bbox
    assert list(metrics) == ["bbox"]
    stats, _, _ = H.pycocotools_direct(gt_path, res_file, "bbox")
    _same(_stats(metrics["bbox"]), stats, backend)

    # the evaluator's own results file (bbox + segmentation per instance) gives its metrics back
    out_dir = tmp_path / "ev"
    ev = COCOEvaluator(gt_path, iou_types=("bbox", "segm"), label_to_cat_id=l2c, output_dir=out_dir,
                       backend=backend)
    ev.process(ids, outs)
    direct_metrics = ev.evaluate()
    written = json.loads((out_dir / "coco_instances_results.json").read_text())
    assert len(written) == sum(len(o["scores"]) for o in outs)
    assert all(set(r) == {"image_id", "category_id", "score", "bbox", "segmentation"} for r in written)
    again = evaluate_results_json(out_dir / "coco_instances_results.json", gt_path, backend=backend)
    assert list(again) == ["bbox", "segm"]
    for t in ("bbox", "segm"):
        np.testing.assert_array_equal(_stats(again[t]), _stats(direct_metrics[t]))


def test_output_files_metrics_json_and_pr_curves(gt_path, synthetic, tmp_path):
    ids, outs, l2c = synthetic
    ev = COCOEvaluator(gt_path, iou_types=("segm",), label_to_cat_id=l2c, output_dir=tmp_path)
    ev.process(ids, outs)
    metrics = ev.evaluate()
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["units"] == "fraction" and report["num_images"] == 16
    assert report["segm"]["stats"] == ev.stats["segm"] == [metrics["segm"][k] for k in METRIC_NAMES]
    assert report["segm"]["per_category_AP"]["person"] == metrics["segm"]["AP-person"]
    png = tmp_path / "pr_curve_segm.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not (tmp_path / "pr_curve_bbox.png").exists()
    # segm-only results carry no bbox key (pycocotools would take the box area instead of the mask's)
    written = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert written and all("bbox" not in r and isinstance(r["segmentation"]["counts"], str) for r in written)


def test_perfect_predictions_give_ap_one(gt_path, gt):
    ids, outs = H.perfect_outputs(gt, with_masks=True)
    l2c, _ = H.label_maps(gt)
    assert max(max(o["labels"].tolist(), default=0) for o in outs) <= 80  # contiguous labels, not cat ids
    for o in outs[::2]:  # half the images as Mask R-CNN gives them: [N, 1, H, W] probabilities
        o["masks"] = (o["masks"].float() * 0.6 + 0.2).unsqueeze(1)  # 0 -> 0.2, 1 -> 0.8
    ev = COCOEvaluator(gt_path, iou_types=("bbox", "segm"), label_to_cat_id=l2c)
    ev.process(ids, outs)
    metrics = ev.evaluate()
    # pycocotools' precision is tp / (tp + fp + eps): 1 - 2e-16 for a category with a single object
    one = pytest.approx(1.0, abs=1e-14)  # measured: 0 on all 88 (pycocotools' eps could make one 1 - 2e-16)
    for t in ("bbox", "segm"):
        m = metrics[t]
        for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
            assert m[k] == one, (t, k, m[k])
        assert m["AR1"] < 0.9  # maxDets=1 cannot recall every object of a crowded image
        per_cat = [v for k, v in m.items() if k.startswith("AP-")]
        assert len(per_cat) == 37 and all(v == one for v in per_cat)


def test_no_predictions_give_zero_and_a_warning(gt_path, gt):
    ids = sorted(gt.getImgIds())
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    ev = COCOEvaluator(gt_path)
    ev.process(ids, [empty] * len(ids))
    with pytest.warns(COCOEvalWarning, match="no detections"):
        metrics = ev.evaluate()
    # tiny COCO has small, medium and large objects: every one of the 12 settings has ground truth
    assert _stats(metrics["bbox"]).tolist() == [0.0] * 12
    assert not any(k.startswith("AP-") and v != 0.0 for k, v in metrics["bbox"].items())

    ev.reset()  # nothing processed at all: all images, no detections, a warning, no crash
    with pytest.warns(COCOEvalWarning, match="no image was processed"):
        assert ev.evaluate()["bbox"]["AP"] == 0.0


def test_no_predictions_give_minus_one_where_no_ground_truth(tiny_coco):
    # keep only large objects: the small / medium settings have no ground truth -> -1, as pycocotools
    path = tiny_coco / "annotations.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["area"] > 96**2]
    path.write_text(json.dumps(data))
    ev = COCOEvaluator(path)
    with pytest.warns(COCOEvalWarning):
        stats = _stats(ev.evaluate()["bbox"])
    assert stats.tolist() == [0, 0, 0, -1, -1, 0, 0, 0, 0, -1, -1, 0]


def test_unknown_image_id_raises_listing_it(gt_path, gt, tmp_path):
    ids, outs = H.perfect_outputs(gt)
    ev = COCOEvaluator(gt_path, label_to_cat_id=H.label_maps(gt)[0])
    with pytest.raises(ValueError, match=r"image ids \[987654321\] that are not in the annotations"):
        ev.process([ids[0], 987654321], outs[:2])
    res = [
        {"image_id": 987654321, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},
        {"image_id": 123, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},
    ]
    (tmp_path / "r.json").write_text(json.dumps(res))
    with pytest.raises(ValueError, match=r"image ids \[123, 987654321\]"):
        evaluate_results_json(tmp_path / "r.json", gt_path)


def test_unknown_category_raises(gt_path, gt, tmp_path):
    img = sorted(gt.getImgIds())[0]
    out = {
        "boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([12]),
    }
    # 12 is not a COCO category id (ids 1..90 have gaps)
    with pytest.raises(ValueError, match=r"category ids \[12\] are not in the annotations"):
        COCOEvaluator(gt_path).process([img], [out])
    with pytest.raises(ValueError, match=r"maps to category ids \[12\]"):
        COCOEvaluator(gt_path, label_to_cat_id={1: 1, 2: 12})
    with pytest.raises(ValueError, match=r"labels \[12\] are not keys of label_to_cat_id"):
        COCOEvaluator(gt_path, label_to_cat_id={1: 1}).process([img], [out])
    (tmp_path / "r.json").write_text(
        json.dumps([{"image_id": img, "category_id": 12, "bbox": [1, 2, 3, 4], "score": 0.5}])
    )
    with pytest.raises(ValueError, match=r"category ids \[12\]"):
        evaluate_results_json(tmp_path / "r.json", gt_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_box_raises_naming_the_image(gt_path, gt, bad):
    img = sorted(gt.getImgIds())[3]
    out = {
        "boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, bad, 9.0, 9.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([1, 1]),
    }
    ev = COCOEvaluator(gt_path)
    with pytest.raises(ValueError, match=rf"image {img}: boxes contain NaN or inf"):
        ev.process([img], [out])
    assert ev._predictions == {}  # nothing was stored for the rejected batch


def test_xywh_boxes_passed_as_xyxy_are_rejected(gt_path, gt):
    img = sorted(gt.getImgIds())[0]
    out = {
        "boxes": torch.tensor([[100.0, 100.0, 20.0, 30.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
    }
    with pytest.raises(ValueError, match=rf"image {img}: boxes with x2 < x1"):
        COCOEvaluator(gt_path).process([img], [out])


def test_mask_of_wrong_size_is_rejected(gt_path, gt):
    img = sorted(gt.getImgIds())[0]
    h, w = gt.imgs[img]["height"], gt.imgs[img]["width"]
    out = {
        "boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
        "masks": torch.rand(1, 1, 28, 28),
    }
    expected = rf"image {img}: masks have shape \[1, 1, 28, 28\], expected \[1, 1, {h}, {w}\]"
    with pytest.raises(ValueError, match=expected):
        COCOEvaluator(gt_path, iou_types=("segm",)).process([img], [out])


def test_annotation_id_zero_is_renumbered_with_a_warning(tiny_coco):
    path = tiny_coco / "annotations.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["id"] = 0
    assert not data["annotations"][0]["iscrowd"]
    path.write_text(json.dumps(data))
    gt = H.quiet_coco(path)
    ids, outs = H.perfect_outputs(gt)
    l2c, _ = H.label_maps(gt)
    # the pitfall is real: plain pycocotools never counts the match to annotation id 0
    stats, _, _ = H.pycocotools_direct(path, H.direct_results(ids, outs, l2c, "bbox"), "bbox")
    assert stats[0] < 1.0
    with pytest.warns(COCOEvalWarning, match="id 0"):
        ev = COCOEvaluator(path, label_to_cat_id=l2c)
    ev.process(ids, outs)
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx(1.0, abs=1e-14)  # measured: 0


@pytest.mark.parametrize("backend", ["faster-coco-eval", "pycocotools"])
def test_callers_coco_object_is_not_modified(gt_path, gt, synthetic, backend):
    ids, outs, l2c = synthetic
    before = json.dumps(gt.dataset, sort_keys=True)
    ev = COCOEvaluator(gt, iou_types=("segm",), label_to_cat_id=l2c, backend=backend)
    ev.process(ids, outs)
    ev.evaluate()
    assert json.dumps(gt.dataset, sort_keys=True) == before  # the evaluator wrote only into the private copy
    # pycocotools rewrites polygons to RLE, faster-coco-eval adds an "rle" key: the copy was really written to
    written = (lambda a: isinstance(a["segmentation"], dict)) if backend == "pycocotools" else (lambda a: "rle" in a)
    assert any(written(a) for a in ev.coco_gt.dataset["annotations"] if not a["iscrowd"])


def test_same_image_processed_twice_counts_once(gt_path, synthetic):
    ids, outs, l2c = synthetic
    once = COCOEvaluator(gt_path, label_to_cat_id=l2c)
    once.process(ids, outs)
    twice = COCOEvaluator(gt_path, label_to_cat_id=l2c)
    twice.process(ids, outs)
    twice.process(ids[:5], outs[:5])  # e.g. DistributedSampler padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no subset warning: all images were processed
        a, b = once.evaluate(), twice.evaluate()
    assert a == b


def test_subset_of_images_is_evaluated_with_a_warning(gt_path, synthetic):
    ids, outs, l2c = synthetic
    ev = COCOEvaluator(gt_path, label_to_cat_id=l2c)
    ev.process(ids[:4], outs[:4])
    with pytest.warns(COCOEvalWarning, match="evaluating 4 of the 16 images"):
        metrics = ev.evaluate()
    assert len(ev.coco_eval["bbox"].params.imgIds) == 4
    assert metrics["bbox"]["AP"] > 0


@pytest.mark.parametrize("layout", ["NHW-bool", "N1HW-prob", "NHW-uint8"])
def test_encode_masks_roundtrip(layout):
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 1, 17, 23, generator=gen)
    binary = (probs > 0.5)[:, 0].numpy()
    masks = {"NHW-bool": torch.from_numpy(binary), "N1HW-prob": probs, "NHW-uint8": binary.astype(np.uint8)}[
        layout
    ]
    rles = encode_masks(masks)
    assert len(rles) == 3 and all(isinstance(r["counts"], str) and r["size"] == [17, 23] for r in rles)
    decoded = mask_util.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), binary.astype(np.uint8))
    assert encode_masks(np.zeros((0, 5, 5), bool)) == []
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        encode_masks(np.zeros((5, 5)))


def test_results_json_bad_input(gt_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="results file not found"):
        evaluate_results_json(tmp_path / "missing.json", gt_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        evaluate_results_json(tmp_path / "bad.json", gt_path)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty list"):
        evaluate_results_json(tmp_path / "empty.json", gt_path)
    (tmp_path / "nan.json").write_text(
        '[{"image_id": 1, "category_id": 1, "bbox": [1, NaN, 2, 2], "score": 1}]'
    )
    with pytest.raises(ValueError, match="4 finite numbers"):
        evaluate_results_json(tmp_path / "nan.json", gt_path)


def test_class_names_forms(gt_path, gt, synthetic):
    ids, outs, l2c = synthetic
    cat_ids = sorted(gt.getCatIds())
    upper = [gt.cats[c]["name"].upper() for c in cat_ids]
    by_label = ["background", *upper]  # the dataset's class_names: indexed by contiguous label
    by_cat = ["N/A"] * (max(cat_ids) + 1)  # torchvision's convention: indexed by category id
    for c, n in zip(cat_ids, upper):
        by_cat[c] = n
    forms = [
        dict(class_names=upper, label_to_cat_id=l2c),
        dict(class_names=by_label, label_to_cat_id=l2c),
        dict(class_names={c: n for c, n in zip(cat_ids, upper)}, label_to_cat_id=l2c),
        dict(class_names=by_cat),
    ]
    for kwargs in forms:
        ev = COCOEvaluator(gt_path, **kwargs)
        assert ev.category_names == dict(zip(cat_ids, upper)), kwargs
    ev = COCOEvaluator(gt_path, class_names=by_label, label_to_cat_id=l2c)
    ev.process(ids, outs)
    assert "AP-PERSON" in ev.evaluate()["bbox"]
    with pytest.raises(ValueError, match="class_names has 3 names for 80 categories"):
        COCOEvaluator(gt_path, class_names=["a", "b", "c"])


def test_instances_to_coco_json_is_the_evaluators_converter(gt_path, synthetic):
    ids, outs, l2c = synthetic
    ev = COCOEvaluator(gt_path, iou_types=("bbox", "segm"), label_to_cat_id=l2c)
    ev.process(ids[:3], outs[:3])
    for img_id, out in zip(ids[:3], outs[:3]):
        # What the evaluator stored is exactly what the public converter gives (boxes and masks inferred).
        assert ev._predictions[img_id] == instances_to_coco_json(img_id, out, l2c)
    out = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([2]), "masks": torch.tensor([[[0.2, 0.7], [0.9, 0.5]]])[:, None]}
    (r,) = instances_to_coco_json(5, out, {1: 10, 2: 20})
    assert (r["image_id"], r["category_id"], r["score"], r["bbox"]) == (5, 20, 0.5, [1.0, 2.0, 10.0, 20.0])
    # RLE of the mask thresholded at 0.5 (0.5 itself is background), column-major.
    decoded = mask_util.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()})
    assert decoded.tolist() == [[0, 1], [1, 0]]
    assert instances_to_coco_json(5, {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                                      "boxes": torch.zeros(0, 4)}) == []
    with pytest.raises(ValueError, match=r"image 5: labels \[3\] are not keys of label_to_cat_id"):
        instances_to_coco_json(5, {**out, "labels": torch.tensor([3])}, {1: 10, 2: 20})
    with pytest.raises(ValueError, match="neither 'boxes' nor 'masks'"):
        instances_to_coco_json(5, {"scores": torch.tensor([0.5]), "labels": torch.tensor([1])})
    with pytest.raises(ValueError, match=r"masks have shape \[1, 1, 2, 2\], expected \[1, 1, 3, 3\]"):
        instances_to_coco_json(5, out, iou_types=("segm",), image_size=(3, 3))


def test_the_tables_reach_the_run_log_when_logging_is_set_up(gt_path, synthetic, tmp_path, capsys):
    from resnet_det_common import logging_scope

    ids, outs, l2c = synthetic
    ev = COCOEvaluator(gt_path, label_to_cat_id=l2c)
    ev.process([{"image_id": i} for i in ids], outs)  # the dataset's targets as inputs
    with logging_scope(tmp_path):
        ev.evaluate()
    assert capsys.readouterr().out == ""  # logged, not printed
    log = (tmp_path / "log.txt").read_text()
    pycocotools_lines = H.table_lines(log)
    assert len(pycocotools_lines) == 12 and "| person" in log
    with pytest.raises(ValueError, match=r"inputs\[0\] has no 'image_id'"):
        ev.process([{"id": ids[0]}], outs[:1])

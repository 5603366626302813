"""The analysis' numbers: COCO matching and AP against pycocotools (bit for bit), TIDE against the
authors' ``tidecv`` (every difference named and measured), D-ECE and the diagnostics on constructed
cases whose answer is known."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import evalhelpers
import numpy as np
import pytest

from resnet_det.evaluation.analysis import analyze_results, detection_ece
from resnet_det.evaluation.analysis import diagnostics as diag
from resnet_det.evaluation.analysis import matching as M
from resnet_det.evaluation.analysis import tide as T

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def _results(gt, seed: int) -> list[dict]:
    l2c, _ = evalhelpers.label_maps(gt)
    ids, outs = evalhelpers.synthetic_outputs(gt, seed=seed)
    return evalhelpers.direct_results(ids, outs, l2c, "bbox")


def _problem(gt, results, iou_type: str = "bbox") -> M.Problem:
    kw = {}
    if iou_type == "segm":
        from pycocotools import mask as mask_util

        kw = {"mask_iou": mask_util.iou, "gt_segm": gt.annToRLE}
    return M.build_problem(gt.dataset["annotations"], gt.getImgIds(), gt.getCatIds(), results, iou_type, **kw)


def _precision(p: M.Problem, m: M.Matching) -> np.ndarray:
    npos = np.bincount(p.gt_cat[~m.gt_ignored], minlength=len(p.cat_ids))
    return M.precision_table(p.dt_cat, p.dt_rank, m.dt_tp, ~m.dt_ignored, npos)


def _random_set(seed: int) -> tuple[dict, list[dict]]:
    """A randomised COCO set with what breaks evaluators: crowds, empty images, categories without gt,
    > 100 detections per image and category, tied scores and integer boxes (IoUs exactly at 0.5)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 3, 4, 7, 9)]
    images = [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in (5, 2, 11, 8, 3, 20)]
    anns, aid = [], 1
    for img in images[:-1]:  # the last image has no gt
        for _ in range(int(rng.integers(0, 9))):
            x, y = rng.integers(0, 150, 2)
            w, h = rng.integers(4, 60, 2)
            crowd = int(rng.random() < 0.15)
            cat = int(rng.choice([1, 3, 4, 7]))  # category 9 has no gt
            anns.append({"id": aid, "image_id": img["id"], "category_id": cat, "bbox": [int(x), int(y), int(w), int(h)],
                         "area": float(w * h), "iscrowd": crowd})
            aid += 1
    results = []
    for a in anns:  # near-gt detections, some relabelled, with tied and integer-valued boxes
        for _ in range(int(rng.integers(0, 4))):
            x, y, w, h = a["bbox"]
            dx, dy = rng.integers(-w // 2 - 1, w // 2 + 2), rng.integers(-h // 2 - 1, h // 2 + 2)
            cat = a["category_id"] if rng.random() < 0.8 else int(rng.choice([1, 3, 4, 7, 9]))
            results.append({"image_id": a["image_id"], "category_id": cat, "bbox": [x + int(dx), y + int(dy), w, h],
                            "score": float(np.round(rng.random(), 1))})
    for img in images:
        for _ in range(int(rng.integers(5, 30))):
            x, y = rng.uniform(0, 150, 2)
            results.append({"image_id": img["id"], "category_id": int(rng.choice([1, 3, 4, 7, 9])),
                            "bbox": [float(x), float(y), float(rng.uniform(2, 50)), float(rng.uniform(2, 50))],
                            "score": float(np.round(rng.random(), 2))})
    busy = anns[0]  # > 100 detections on one image and category, many tied scores
    for _ in range(130):
        x, y, w, h = busy["bbox"]
        results.append({"image_id": busy["image_id"], "category_id": busy["category_id"],
                        "bbox": [x + float(rng.normal(0, 3)), y + float(rng.normal(0, 3)), w, h],
                        "score": float(np.round(rng.random(), 1))})
    rng.shuffle(results)
    return {"images": images, "annotations": anns, "categories": cats}, results


def _cocoeval(dataset: dict, results: list[dict], iou_type: str = "bbox"):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = json.loads(json.dumps(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(json.loads(json.dumps(results))), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return gt, ev


# ----------------------------------------------------------------------------------------------------
# COCO matching and AP: equal to pycocotools, bit for bit
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_equals_pycocotools_on_tiny_coco(gt, gt_path, seed):
    results = _results(gt, seed)
    _, _, ev = evalhelpers.pycocotools_direct(gt_path, results, "bbox")
    p = _problem(gt, results)
    for a, area in enumerate(M.AREA_RANGES):
        for t, thr in enumerate(ev.params.iouThrs):
            got = _precision(p, M.match(p, float(thr), area))
            np.testing.assert_array_equal(got, ev.eval["precision"][t, :, :, a, 2], err_msg=f"{area} IoU {thr}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_equals_pycocotools_on_randomised_sets(seed):
    dataset, results = _random_set(seed)
    coco, ev = _cocoeval(dataset, results)
    p = M.build_problem(coco.dataset["annotations"], coco.getImgIds(), coco.getCatIds(), results, "bbox")
    assert p.n_uncounted >= 30  # the > 100 case is exercised
    for a, area in enumerate(M.AREA_RANGES):
        for t, thr in enumerate(ev.params.iouThrs):
            got = _precision(p, M.match(p, float(thr), area))
            np.testing.assert_array_equal(got, ev.eval["precision"][t, :, :, a, 2], err_msg=f"{area} IoU {thr}")


def test_summary_and_tide_base_equal_pycocotools_stats(gt_path, tmp_path):
    dataset, results = _random_set(4)
    (tmp_path / "gt.json").write_text(json.dumps(dataset))
    _, ev = _cocoeval(dataset, results)
    report = analyze_results(results, tmp_path / "gt.json", progress=False)
    assert report["summary"]["AP"] == ev.stats[0]
    assert report["summary"]["AP50"] == ev.stats[1]
    assert report["summary"]["AP75"] == ev.stats[2]
    assert report["tide"]["AP50"] == ev.stats[1]
    for a, area in enumerate(("small", "medium", "large"), start=1):  # AP50 per size vs COCOeval's precision
        prec = ev.eval["precision"][0, :, :, a, 2]
        assert report["pr_by_size"][area]["AP50"] == (np.mean(prec[prec > -1]) if (prec > -1).any() else -1.0)


def test_segm_ap50_equals_pycocotools(gt, gt_path):
    l2c, _ = evalhelpers.label_maps(gt)
    ids, outs = evalhelpers.synthetic_outputs(gt, seed=3, with_masks=True)
    results = evalhelpers.direct_results(ids, outs, l2c, "segm")
    stats, _, _ = evalhelpers.pycocotools_direct(gt_path, results, "segm")
    report = analyze_results(results, gt_path, iou_type="segm", progress=False)
    assert report["iou_type"] == "segm"
    assert report["summary"]["AP50"] == stats[1]
    assert report["summary"]["AP"] == stats[0]


# ----------------------------------------------------------------------------------------------------
# TIDE against tidecv
# ----------------------------------------------------------------------------------------------------

_TIDECV_NAMES = {"ClassError": "Cls", "BoxError": "Loc", "OtherError": "Both", "DuplicateError": "Dupe",
                 "BackgroundError": "Bkg", "MissedError": "Miss"}


def _tidecv(gt_path: Path, results: list[dict], tmp_path: Path):
    tidecv = pytest.importorskip("tidecv")
    from tidecv import datasets

    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        t = tidecv.TIDE()
        run = t.evaluate(datasets.COCO(str(gt_path)), datasets.COCOResult(str(path)), mode=tidecv.TIDE.BOX)
        errors = t.get_all_errors()
    name = path.stem
    return run, errors["main"][name], errors["special"][name]


def _tidecv_mean(o: T.Oracle, keep_dets: np.ndarray | None = None) -> float:
    """tidecv's mean AP: over the classes with a detection or a gt *after* the fix (AP 0 without gt)."""
    dets = o.num_dets if keep_dets is None else keep_dets
    aps = [o.precision[:, c].mean() if o.num_gts[c] > 0 else 0.0
           for c in range(o.num_gts.size) if dets[c] > 0 or o.num_gts[c] > 0]
    return float(np.mean(aps))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tide_matches_tidecv(gt, gt_path, tmp_path, seed):
    """Equal where the definitions agree, and every difference explained by measuring it:

    * error type of every detection: equal;
    * per-category AP50: tidecv's equals pycocotools' (and ours) to 1e-12 (tidecv's precision has no
      ``eps`` in ``tp / (tp + fp)``: relative differences of 1e-16);
    * tidecv's mean AP (dbolya/tide#14) also averages the classes that only have false positives
      (AP 0) and, after an oracle, drops the classes it emptied: COCO averages the categories with gt.
      Re-averaging our per-category results with tidecv's rule gives tidecv's numbers to 1e-12.
    """
    results = _results(gt, seed)
    p = _problem(gt, results)
    m = M.match(p, 0.5, "all")
    r = T.tide_breakdown(p, m)
    run, main, special = _tidecv(gt_path, results, tmp_path)

    inv = {v: k for k, v in T._LABEL.items()}
    ours = {int(p.dt_index[i]): inv.get(int(v), "TP") for i, v in enumerate(r.classified.label)}
    theirs = {e.pred["_id"]: _TIDECV_NAMES[type(e).__name__] for e in run.errors if hasattr(e, "pred")}
    assert {i: v for i, v in ours.items() if v != "TP"} == theirs
    assert sum(type(e).__name__ == "MissedError" for e in run.errors) == r.counts["Miss"]

    for c, cat in enumerate(p.cat_ids.tolist()):
        if np.isfinite(r.per_category_ap50[c]):
            # measured: 1.8e-15 (vs tidecv on tiny_coco)
            assert run.ap_data.objs[cat].get_ap() / 100 == pytest.approx(r.per_category_ap50[c], abs=1e-13)

    n_tidecv = sum(not o.is_empty() for o in run.ap_data.objs.values())
    n_coco = int(np.isfinite(r.per_category_ap50).sum())
    assert n_tidecv > n_coco  # classes with only false positives: the cause of tidecv's lower AP
    # measured: 3.6e-15 (vs tidecv on tiny_coco)
    assert run.ap / 100 * n_tidecv == pytest.approx(r.ap50 * n_coco, abs=1e-13)
    base = _tidecv_mean(r.oracles["base"])
    assert base == pytest.approx(run.ap / 100, abs=1e-14)  # measured: 1.1e-16 (vs tidecv on tiny_coco)
    for name in T.ERROR_TYPES:
        # measured: 2.2e-16 (vs tidecv on tiny_coco)
        assert _tidecv_mean(r.oracles[name]) - base == pytest.approx(main[name] / 100, abs=1e-14), name
    # tidecv's FP oracle keeps the false positives at score 0 (its classes stay in its mean); ours removes them
    fp_kept = _tidecv_mean(r.oracles["FP"], keep_dets=r.oracles["base"].num_dets)
    # measured: 8.3e-17 (vs tidecv on tiny_coco)
    assert fp_kept - base == pytest.approx(special["FalsePos"] / 100, abs=1e-14)
    # measured: 2.8e-17 (vs tidecv on tiny_coco)
    assert _tidecv_mean(r.oracles["FN"]) - base == pytest.approx(special["FalseNeg"] / 100, abs=1e-14)
    # the FP oracle needs no re-averaging (no class empties): equal after the rescaling of the mean
    # measured: 9.3e-15 (vs tidecv on tiny_coco)
    assert r.dap["FP"] * n_coco == pytest.approx(special["FalsePos"] / 100 * n_tidecv, abs=1e-13)


def test_tide_differs_from_tidecv_on_crowd_covered_detections(gt, gt_path, tmp_path):
    """COCO ignores a detection matched to a crowd (neither TP nor error); tidecv ignores it for AP
    but still gives it an error type. Everything else stays equal."""
    crowd = next(a for a in gt.dataset["annotations"] if a["iscrowd"])
    results = _results(gt, 0)
    x, y, w, h = crowd["bbox"]
    results += [{"image_id": crowd["image_id"], "category_id": crowd["category_id"], "score": s,
                 "bbox": [x + 2, y + 2, w - 4, h - 4]} for s in (0.95, 0.5)]
    p = _problem(gt, results)
    r = T.tide_breakdown(p, M.match(p, 0.5, "all"))
    run, _, _ = _tidecv(gt_path, results, tmp_path)
    added = {len(results) - 2, len(results) - 1}
    pos = {int(p.dt_index[i]): i for i in range(p.num_dets)}
    assert all(r.classified.label[pos[i]] == T.IGNORED for i in added)
    theirs = {e.pred["_id"] for e in run.errors if hasattr(e, "pred")}
    assert added <= theirs
    inv = {v: k for k, v in T._LABEL.items()}
    ours = {int(p.dt_index[i]) for i, v in enumerate(r.classified.label) if int(v) in inv}
    assert ours == theirs - added


def test_tide_differs_from_tidecv_beyond_100_detections_per_image(gt, gt_path, tmp_path):
    """COCO keeps the 100 best detections per image *and category*; tidecv the 100 best per image.
    With 130 detections on one image (no category over 100) ours counts all of them, like pycocotools."""
    img = max(gt.getImgIds(), key=lambda i: len(gt.getAnnIds(imgIds=[i])))
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[img]))
    cats = sorted(gt.getCatIds())
    rng = np.random.default_rng(0)
    results = []
    for n in range(130):
        a = anns[n % len(anns)]
        x, y, w, h = a["bbox"]
        results.append({"image_id": img, "category_id": cats[n % 3] if n % 2 else a["category_id"],
                        "bbox": [x + float(rng.normal(0, 2)), y + float(rng.normal(0, 2)), w, h],
                        "score": float(rng.random())})
    p = _problem(gt, results)
    r = T.tide_breakdown(p, M.match(p, 0.5, "all"))
    assert p.num_dets == 130
    stats, _, _ = evalhelpers.pycocotools_direct(gt_path, results, "bbox")
    assert r.ap50 == stats[1]
    run, _, _ = _tidecv(gt_path, results, tmp_path)
    assert sum(len(o.data_points) for o in run.ap_data.objs.values()) + sum(
        type(e).__name__ != "MissedError" and e.pred["used"] is None for e in run.errors) == 100


def _tiny_problem(gts: list[tuple[int, int, list[float]]], dets: list[tuple[int, int, float, list[float]]],
                  crowd: tuple[int, ...] = ()) -> M.Problem:
    """gts: (image, category, box); dets: (image, category, score, box); boxes xywh."""
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3],
             "iscrowd": int(i in crowd)} for i, (im, c, b) in enumerate(gts)]
    results = [{"image_id": im, "category_id": c, "score": s, "bbox": b} for im, c, s, b in dets]
    imgs = sorted({im for im, *_ in gts} | {im for im, *_ in dets})
    return M.build_problem(anns, imgs, [1, 2], results, "bbox")


def test_tide_constructed_case_has_the_known_answer():
    """Category 1: two gts, one found (TP), one only at IoU 1/3 (Loc). Category 2: one gt found, plus a
    duplicate, a background detection and a category-1 detection on it (Cls, target taken: suppressed).

    Category 1: TP at recall 1/2 -> AP 51/101. Fixing Loc: both found -> 1 (dAP 50/202 over the 2
    categories). Category 2: the TP comes first (score .9): AP 1; Dupe/Bkg cost nothing. Miss: none (the
    unfound gt is the Loc target). FN: category 1 loses its unfound gt -> AP 1, dAP 50/202."""
    box = [0.0, 0.0, 10.0, 10.0]
    gts = [(1, 1, box), (1, 1, [50.0, 50.0, 10.0, 10.0]), (1, 2, [100.0, 100.0, 10.0, 10.0])]
    dets = [(1, 1, 0.9, box), (1, 1, 0.8, [50.0, 55.0, 10.0, 10.0]),  # TP, Loc (IoU 50/150)
            (1, 2, 0.9, [100.0, 100.0, 10.0, 10.0]), (1, 2, 0.7, [100.0, 101.0, 10.0, 10.0]),  # TP, Dupe
            (1, 2, 0.6, [150.0, 150.0, 10.0, 10.0]), (1, 1, 0.5, [100.0, 100.0, 10.0, 9.0])]  # Bkg, Cls
    p = _tiny_problem(gts, dets)
    r = T.tide_breakdown(p, M.match(p, 0.5, "all"))
    assert r.counts == {"Cls": 1, "Loc": 1, "Both": 0, "Dupe": 1, "Bkg": 1, "Miss": 0, "FP": 4, "FN": 1}
    assert r.ap50 == pytest.approx((51 / 101 + 1) / 2, abs=1e-15)  # measured: 1.1e-16
    assert r.dap["Loc"] == pytest.approx((1 - 51 / 101) / 2, abs=1e-14)  # measured: 1.1e-16
    assert r.dap["FN"] == pytest.approx((1 - 51 / 101) / 2, abs=1e-15)  # measured: 0
    for name in ("Cls", "Both", "Dupe", "Bkg", "Miss"):
        assert r.dap[name] == pytest.approx(0.0, abs=1e-15), name  # measured: 0
    # category 1's Loc and Cls detections rank below its TP, so removing every FP changes nothing there
    assert r.dap["FP"] == pytest.approx(0.0, abs=1e-15)  # measured: 0


def test_tide_differs_from_tidecv_when_cls_and_loc_errors_share_a_gt():
    """A missed category-1 gt with a Loc error on it (category 1, IoU 1/3, score .9) and a Cls error
    (category 2, IoU .9, score .5). Our Cls oracle turns the Cls error into the gt's TP: category 1
    goes from AP 0 to 1/2 (the unfixed Loc error still outranks it). tidecv's shared bookkeeping gives
    the gt to the Loc error, which the Cls oracle does not fix: the Cls error is only suppressed and
    category 1 stays at 0. Both Loc oracles give the gt to the Loc error: category 1 AP 1."""
    tidecv = pytest.importorskip("tidecv")
    g = [0.0, 0.0, 10.0, 10.0]
    gts = [(1, 1, g), (1, 2, [50.0, 50.0, 10.0, 10.0])]
    dets = [(1, 1, 0.9, [0.0, 5.0, 10.0, 10.0]), (1, 2, 0.5, [0.0, 0.0, 10.0, 9.0]),
            (1, 2, 0.8, [50.0, 50.0, 10.0, 10.0])]
    p = _tiny_problem(gts, dets)
    r = T.tide_breakdown(p, M.match(p, 0.5, "all"))
    assert r.counts["Loc"] == 1 and r.counts["Cls"] == 1
    # base: category 1 AP 0, category 2 AP 1 (its TP outranks the Cls error) -> 0.5
    assert r.ap50 == pytest.approx(0.5, abs=1e-15)  # measured: 5.6e-17
    assert r.dap["Cls"] == pytest.approx(0.25, abs=1e-15)  # measured: 5.6e-17
    assert r.dap["Loc"] == pytest.approx(0.5, abs=1e-15)  # measured: 5.6e-17

    gt_data, det_data = tidecv.Data("gt"), tidecv.Data("dets")
    for im, c, b in gts:
        gt_data.add_ground_truth(im, c, b)
    for im, c, sc, b in dets:
        det_data.add_detection(im, c, sc, b)
    t = tidecv.TIDE()
    with contextlib.redirect_stdout(io.StringIO()):
        t.evaluate(gt_data, det_data, mode=tidecv.TIDE.BOX)
        main = t.get_main_errors()["dets"]
    assert main["Cls"] == pytest.approx(0.0, abs=1e-15)  # measured: 0
    # measured: 0 (abs 1e-13: a few ulp of 50)
    assert main["Loc"] == pytest.approx(50.0, abs=1e-13)  # the Loc oracle does get the gt, in both


def test_tide_cls_fix_takes_the_target_class_and_one_winner_per_gt():
    """Two category-1 detections on a category-2 gt that nothing found: Cls errors; fixing them gives
    the gt one TP (the higher score) and suppresses the other: category 2's AP goes 0 -> 1."""
    gts = [(1, 2, [0.0, 0.0, 10.0, 10.0]), (1, 1, [50.0, 50.0, 10.0, 10.0])]
    dets = [(1, 1, 0.6, [0.0, 0.0, 10.0, 10.0]), (1, 1, 0.8, [0.0, 0.5, 10.0, 10.0]),
            (1, 1, 0.9, [50.0, 50.0, 10.0, 10.0])]
    p = _tiny_problem(gts, dets)
    r = T.tide_breakdown(p, M.match(p, 0.5, "all"))
    assert r.counts["Cls"] == 2 and r.counts["Miss"] == 0
    # base: category 1 AP 1 (its TP ranks first), category 2 AP 0; Cls oracle: both 1
    assert r.ap50 == pytest.approx(0.5, abs=1e-15)  # measured: 5.6e-17
    assert r.dap["Cls"] == pytest.approx(0.5, abs=1e-15)  # measured: 5.6e-17
    assert r.dap["Miss"] == 0.0  # the gt is a Cls target, not missed


def test_tide_refuses_bad_thresholds(gt_path):
    with pytest.raises(ValueError, match="0 < t_b < t_f <= 1"):
        analyze_results([{"image_id": 1, "category_id": 1, "score": 1.0, "bbox": [0, 0, 1, 1]}], gt_path,
                        t_f=0.1, t_b=0.5, progress=False)


# ----------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------


def test_d_ece_of_perfectly_calibrated_detections_is_zero():
    scores, correct = [], []
    for b in range(10):  # in each bin, the fraction correct equals the (single) score
        s = (b + 0.5) / 10
        scores += [s] * 20
        correct += [True] * round(20 * s) + [False] * (20 - round(20 * s))
    cal = detection_ece(np.asarray(scores), np.asarray(correct))
    assert cal.d_ece == pytest.approx(0.0, abs=1e-15)  # measured: 7.0e-17
    np.testing.assert_allclose(cal.precision, cal.confidence, atol=1e-14)  # measured: 3.3e-16
    assert cal.count.tolist() == [20] * 10


def test_d_ece_of_confident_wrong_detections_is_their_confidence():
    cal = detection_ece(np.full(50, 0.99), np.zeros(50, bool), bins=10)
    assert cal.d_ece == pytest.approx(0.99, abs=1e-14)  # measured: 3.3e-16
    assert cal.count[-1] == 50 and cal.precision[-1] == 0.0


def test_d_ece_end_to_end_on_tiny_coco(gt, gt_path):
    """Exact gt boxes (TPs) and boxes of a category without gt (FPs), scored so that each score's
    precision equals it (0.5: one FP per TP; 0.8: one FP per 4 TPs): D-ECE 0 through the whole
    pipeline. The false positives alone, all scored 0.99: D-ECE 0.99."""
    anns = [a for a in gt.dataset["annotations"] if not a["iscrowd"]]
    no_gt = min(set(gt.getCatIds()) - {a["category_id"] for a in gt.dataset["annotations"]})
    img_ids = sorted(gt.getImgIds())
    half = 100
    n_high = (len(anns) - half) // 4 * 4
    tps = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
            "score": 0.5 if i < half else 0.8} for i, a in enumerate(anns[: half + n_high])]
    fps = [{"image_id": img_ids[i % len(img_ids)], "category_id": no_gt, "bbox": [1.0, 1.0, 2.0, 2.0],
            "score": 0.5 if i < half else 0.8} for i in range(half + n_high // 4)]
    report = analyze_results(tps + fps, gt_path, progress=False)
    cal = report["calibration"]
    assert cal["num_detections"] == len(tps) + len(fps)
    assert cal["precision"][5] == 0.5 and cal["precision"][8] == pytest.approx(0.8, abs=1e-15)  # measured: 0
    assert cal["D-ECE"] == pytest.approx(0.0, abs=1e-14)  # measured: 6.7e-16
    wrong = [dict(r, score=0.99) for r in fps]
    # measured: 2.1e-15
    assert analyze_results(wrong, gt_path, progress=False)["calibration"]["D-ECE"] == pytest.approx(0.99, abs=1e-13)


def test_calibration_refuses_scores_outside_0_1():
    with pytest.raises(ValueError, match=r"confidences in \[0, 1\]"):
        detection_ece(np.array([0.5, 3.0]), np.array([True, False]))


# ----------------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------------


def test_confusion_matrix_constructed():
    """A category-1 gt covered only by a category-2 detection, a found category-2 gt, a missed
    category-1 gt and a background detection of category 1."""
    gts = [(1, 1, [0.0, 0.0, 10.0, 10.0]), (1, 2, [50.0, 50.0, 10.0, 10.0]), (1, 1, [100.0, 100.0, 10.0, 10.0])]
    dets = [(1, 2, 0.9, [0.0, 0.0, 10.0, 10.0]), (1, 2, 0.8, [50.0, 50.0, 10.0, 10.0]),
            (1, 1, 0.7, [150.0, 150.0, 10.0, 10.0])]
    p = _tiny_problem(gts, dets)
    cm = diag.confusion_matrix(p, M.match(p, 0.5, "all"))
    # rows: cat 1, cat 2, background; columns: cat 1, cat 2, missed
    assert cm.tolist() == [[0, 1, 1], [0, 1, 0], [1, 0, 0]]


def test_confusion_rows_sum_to_the_gts(gt):
    p = _problem(gt, _results(gt, 1))
    m = M.match(p, 0.5, "all")
    cm = diag.confusion_matrix(p, m)
    real = ~p.gt_crowd
    np.testing.assert_array_equal(cm[:-1].sum(axis=1), np.bincount(p.gt_cat[real], minlength=len(p.cat_ids)))
    assert cm[-1].sum() <= m.dt_fp.sum()


@pytest.mark.parametrize("seed", [1, 5])
def test_image_gains_equal_recomputing_the_ap(gt, seed):
    """The per-image gains (computed for every image at once) equal fixing each image and re-running
    the AP: differences are floating-point summation order (measured: < 3e-16)."""
    p = _problem(gt, _results(gt, seed))
    m = M.match(p, 0.5, "all")
    gains = diag.image_ap_gains(p, m, max_cells=64)  # small steps: the chunking is exercised too
    npos = np.bincount(p.gt_cat[~m.gt_ignored], minlength=len(p.cat_ids))
    base = M.average_precision(_precision(p, m))
    assert (gains >= 0).all() and gains.max() > 0
    for i in range(len(p.img_ids)):
        keep = ~m.dt_ignored & ~((p.dt_img == i) & m.dt_fp)
        missed = (p.gt_img == i) & ~m.gt_matched & ~m.gt_ignored
        n2 = npos - np.bincount(p.gt_cat[missed], minlength=npos.size)
        prec = M.precision_table(p.dt_cat, p.dt_rank, m.dt_tp, keep, n2)
        prec[:, (npos > 0) & (n2 == 0)] = 0.0
        # measured: 1.9e-16 (the docstring's < 3e-16)
        assert gains[i] == pytest.approx(M.average_precision(prec) - base, abs=1e-14), i

"""Analysis of COCO detection results: why the AP is what it is.

:func:`analyze_results` takes a COCO results JSON and the instances JSON and computes, on COCO's own
matching (:mod:`.matching`: pycocotools' greedy per-image, per-category matching, crowds ignored,
100 detections per image and category, bit-identical AP):

* TIDE's error breakdown (:mod:`.tide`, Bolya et al. ECCV 2020): classification, localisation, both,
  duplicate, background and missed errors with their dAP50, and the false-positive / false-negative
  dAP50; its base AP50 *is* pycocotools' ``stats[1]``;
* calibration (:mod:`.calibration`): D-ECE (Küppers et al. CVPR-W 2020) over confidence bins,
  detections correct when they are true positives at IoU 0.5, and a reliability diagram;
* per-category AP (IoU .50:.95, .50, .75) sorted worst first, precision-recall curves at IoU 0.5 for
  small / medium / large objects, a category confusion matrix at IoU 0.5 and the images that lose
  the most AP50 (:mod:`.diagnostics` defines both).

With ``output_dir`` it writes ``metrics.json`` (every number), the PNG plots
(:data:`.report.PLOTS`) and ``report.html`` (one page, plots inline, opens offline). Metrics are
fractions, like every metric of this project. The TIDE table and the D-ECE go to the logger
``resnet_det.evaluation.analysis`` (or stdout when logging is not set up), as the COCO tables do.

Inputs are checked by the evaluation's own loaders (:func:`~resnet_det.evaluation.load_results_json`,
:func:`~resnet_det.evaluation.load_coco_gt` and the results validation of
:func:`~resnet_det.evaluation.evaluate_results_json`): the same errors, the same messages.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resnet_det_common import log_report, progress_bar

from .calibration import Calibration, detection_ece
from .diagnostics import confusion_matrix, image_ap_gains
from .matching import AREA_RANGES, MAX_DETS, REC_THRS, Matching, Problem, build_problem, match, precision_table
from .report import PLOTS, format_tide_table, render_html, write_plots
from .tide import ERROR_TYPES, SPECIAL_ERROR_TYPES, TideResult, tide_breakdown

__all__ = [
    "ANALYSIS_FILENAME",
    "ERROR_TYPES",
    "HTML_FILENAME",
    "PLOTS",
    "SPECIAL_ERROR_TYPES",
    "Calibration",
    "TideResult",
    "analyze_results",
    "detection_ece",
]

ANALYSIS_FILENAME = "metrics.json"
HTML_FILENAME = "report.html"
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1)  # pycocotools' iouThrs
_STAGES = 8
_log = logging.getLogger(__name__)


def _none_nan(v: Any) -> Any:
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _none_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_none_nan(x) for x in v]
    return v


def _floats(a: np.ndarray) -> list[Any]:
    return _none_nan([float(x) for x in np.asarray(a, dtype=float).tolist()])


def _check_thresholds(t_f: float, t_b: float, bins: int, top_images: int) -> None:
    if not (0.0 < t_b < t_f <= 1.0):
        raise ValueError(f"TIDE needs 0 < t_b < t_f <= 1, got t_f={t_f!r}, t_b={t_b!r} (the paper: 0.5 and 0.1)")
    if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"calibration_bins must be a positive integer, got {bins!r}")
    if not isinstance(top_images, (int, np.integer)) or isinstance(top_images, bool) or top_images < 0:
        raise ValueError(f"top_images must be a non-negative integer, got {top_images!r}")


def _load(results_json: Any, annotations_json: Any, iou_type: str | None) -> tuple[list[dict[str, Any]], Any, str]:
    """The evaluation's loaders and validation (one validator in the project)."""
    from ..coco_core import _check_iou_types, _infer_iou_types, _validate_results, load_coco_gt, load_results_json

    results = load_results_json(results_json)
    if iou_type is None:
        types = _infer_iou_types(results)
        iou_type = "bbox" if "bbox" in types else "segm"
    else:
        (iou_type,) = _check_iou_types(iou_type)
    coco_gt = load_coco_gt(annotations_json, iou_types=(iou_type,))
    where = f"results file {results_json}" if isinstance(results_json, (str, Path)) else "results"
    _validate_results(results, coco_gt, (iou_type,), where)
    return results, coco_gt, iou_type


def _precision(p: Problem, m: Matching) -> np.ndarray:
    npos = np.bincount(p.gt_cat[~m.gt_ignored], minlength=len(p.cat_ids))
    return precision_table(p.dt_cat, p.dt_rank, m.dt_tp, ~m.dt_ignored, npos)


def _mean_valid(a: np.ndarray) -> float:
    v = a[a > -1]
    return float(np.mean(v)) if v.size else -1.0


def analyze_results(
    results_json: str | Path | Sequence[Mapping[str, Any]],
    annotations_json: str | Path | Any,
    *,
    iou_type: str | None = None,
    output_dir: str | Path | None = None,
    t_f: float = 0.5,
    t_b: float = 0.1,
    calibration_bins: int = 10,
    top_images: int = 20,
    progress: bool = True,
) -> dict[str, Any]:
    """Analyses COCO results against ground truth (see the package docstring).

    Args:
        results_json: A COCO results JSON file, or the loaded list (``bbox`` ``[x, y, w, h]`` and/or
            RLE ``segmentation``).
        annotations_json: The instances JSON file, or a pycocotools ``COCO``.
        iou_type: ``"bbox"`` or ``"segm"``; ``None``: bbox if the results have boxes, else segm.
        output_dir: Where ``metrics.json``, the PNGs and ``report.html`` go; ``None`` writes nothing.
        t_f: TIDE's foreground IoU threshold (the matching threshold of the breakdown).
        t_b: TIDE's background IoU threshold.
        calibration_bins: Equal-width confidence bins of the D-ECE.
        top_images: How many of the images that lose the most AP50 to list (``metrics.json`` has the
            gain of every image).
        progress: A progress bar on a terminal (stderr); stage times are logged at INFO either way.

    Returns:
        The report: the dict written to ``metrics.json``.

    Raises:
        FileNotFoundError: A file does not exist.
        ValueError: A file is not JSON, the results are empty or malformed (not a list, a missing key,
            an unknown image or category id, a non-finite score or box, ...), or a parameter is out of range.
    """
    _check_thresholds(t_f, t_b, calibration_bins, top_images)
    times: dict[str, float] = {}
    cpu_times: dict[str, float] = {}
    clock = [time.perf_counter(), time.process_time()]

    with progress_bar(total=_STAGES, desc="analyze", unit="stage", enabled=progress, leave=False) as bar:

        def stage(name: str) -> None:
            now, cpu = time.perf_counter(), time.process_time()
            times[name], cpu_times[name] = round(now - clock[0], 3), round(cpu - clock[1], 3)
            clock[:] = [now, cpu]
            _log.info("analysis: %s took %.2f s (CPU %.2f s)", name, times[name], cpu_times[name])
            if bar is not None:
                bar.set_postfix_str(name, refresh=False)
                bar.update(1)

        results, coco_gt, iou_type = _load(results_json, annotations_json, iou_type)
        stage("load and validate")
        img_ids = sorted(coco_gt.getImgIds())
        cat_ids = sorted(coco_gt.getCatIds())
        mask_iou = gt_segm = None
        if iou_type == "segm":
            from pycocotools import mask as mask_util

            mask_iou, gt_segm = mask_util.iou, coco_gt.annToRLE
        p = build_problem(coco_gt.dataset["annotations"], img_ids, cat_ids, results, iou_type,
                          mask_iou=mask_iou, gt_segm=gt_segm)
        stage("IoU")
        matches = {float(t): match(p, float(t), "all") for t in IOU_THRS}
        m50 = matches[0.5]
        prec_all = np.stack([_precision(p, matches[float(t)]) for t in IOU_THRS])  # [T, R, K]
        sizes = {a: (m50, prec_all[0]) if a == "all" else (mm := match(p, 0.5, a), _precision(p, mm))
                 for a in AREA_RANGES}
        stage("matching")
        tr = tide_breakdown(p, match(p, t_f, "all") if t_f != 0.5 else m50, t_f=t_f, t_b=t_b)
        stage("TIDE")
        counted = ~m50.dt_ignored
        scores = p.dt_score[counted]
        cal_note = None
        try:
            cal: Calibration | None = detection_ece(scores, m50.dt_tp[counted], bins=calibration_bins)
        except ValueError as e:
            cal, cal_note = None, str(e)
        stage("calibration")
        cm = confusion_matrix(p, m50)
        gains = image_ap_gains(p, m50)
        stage("confusion and images")

        report = _build_report(p, coco_gt, iou_type, matches, prec_all, sizes, tr, cal, cal_note, cm, gains,
                               top_images, results_json, annotations_json, calibration_bins)
        report["timings_s"] = times  # wall; the CPU times tell the work apart from a busy machine
        report["timings_cpu_s"] = cpu_times
        log_report(_log, format_tide_table(report))
        if output_dir is not None:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            plots = write_plots(report, out)
            report["files"] = {"html": HTML_FILENAME, "metrics": ANALYSIS_FILENAME,
                               **{k: v.name for k, v in plots.items()}}
            stage("plots")
            (out / HTML_FILENAME).write_text(render_html(report, plots), encoding="utf-8")
            (out / ANALYSIS_FILENAME).write_text(json.dumps(_none_nan(report), indent=1), encoding="utf-8")
            stage("html and metrics.json")
            _log.info("analysis: wrote %s, %s and %d plots to %s", HTML_FILENAME, ANALYSIS_FILENAME, len(plots), out)
    return _none_nan(report)


def _build_report(p: Problem, coco_gt: Any, iou_type: str, matches: dict[float, Matching], prec_all: np.ndarray,
                  sizes: dict[str, tuple[Matching, np.ndarray]], tr: TideResult, cal: Calibration | None,
                  cal_note: str | None, cm: np.ndarray, gains: np.ndarray, top_images: int, results_json: Any,
                  annotations_json: Any, bins: int) -> dict[str, Any]:
    names = [str(coco_gt.cats[int(c)].get("name", c)) for c in p.cat_ids]
    k = len(names)
    m50 = matches[0.5]
    t50 = 0
    t75 = int(np.argmin(np.abs(IOU_THRS - 0.75)))
    summary = {"AP": _mean_valid(prec_all), "AP50": _mean_valid(prec_all[t50]), "AP75": _mean_valid(prec_all[t75])}

    counted = ~m50.dt_ignored
    real = ~p.gt_crowd
    num_gt = np.bincount(p.gt_cat[real], minlength=k)
    num_det = np.bincount(p.dt_cat[counted], minlength=k)
    fp = np.bincount(p.dt_cat[m50.dt_fp], minlength=k)
    fn = np.bincount(p.gt_cat[real & ~m50.gt_matched], minlength=k)
    valid = (prec_all[0] > -1).all(axis=0)
    per_cat = []
    for c in range(k):
        if not valid[c] and num_det[c] == 0:
            continue
        ap = float(prec_all[:, :, c].mean()) if valid[c] else None
        per_cat.append({
            "category": names[c], "id": int(p.cat_ids[c]), "AP": ap,
            "AP50": float(prec_all[t50, :, c].mean()) if valid[c] else None,
            "AP75": float(prec_all[t75, :, c].mean()) if valid[c] else None,
            "num_gt": int(num_gt[c]), "num_detections": int(num_det[c]), "false_positives": int(fp[c]),
            "missed": int(fn[c]),
        })
    per_cat.sort(key=lambda r: (r["AP"] is None, r["AP"] if r["AP"] is not None else 0.0, r["category"]))

    pr_sizes = {}
    for area, (mm, prec) in sizes.items():
        ok = (prec > -1).all(axis=0)
        pr_sizes[area] = {
            "AP50": _mean_valid(prec), "num_categories": int(ok.sum()),
            "num_gt": int((~mm.gt_ignored).sum()), "recall": _floats(REC_THRS),
            "precision": _floats(prec[:, ok].mean(axis=1)) if ok.any() else None,
        }

    pairs = []
    for g in range(k):
        row_total = cm[g].sum()
        for d in range(k + 1):
            if d != g and cm[g, d] > 0 and d < k:
                pairs.append({"gt": names[g], "predicted": names[d], "count": int(cm[g, d]),
                              "fraction": float(cm[g, d] / row_total)})
    pairs.sort(key=lambda r: (-r["count"], -r["fraction"], r["gt"], r["predicted"]))

    imgs = coco_gt.imgs
    tp_img = np.bincount(p.dt_img[m50.dt_tp], minlength=len(p.img_ids))
    fp_img = np.bincount(p.dt_img[m50.dt_fp], minlength=len(p.img_ids))
    miss_img = np.bincount(p.gt_img[~m50.gt_matched & ~m50.gt_ignored], minlength=len(p.img_ids))
    gt_img = np.bincount(p.gt_img[~m50.gt_ignored], minlength=len(p.img_ids))
    worst = np.lexsort((p.img_ids, -gains))[:top_images]
    worst_rows = [{"image_id": int(p.img_ids[i]), "file_name": str(imgs[int(p.img_ids[i])].get("file_name", "")),
                   "AP50_gain": float(gains[i]), "num_gt": int(gt_img[i]), "tp": int(tp_img[i]),
                   "fp": int(fp_img[i]), "missed": int(miss_img[i])} for i in worst.tolist() if gains[i] > 0]

    if cal is not None:
        calib: dict[str, Any] = {
            "D-ECE": cal.d_ece, "iou_thr": 0.5, "num_detections": cal.num_detections,
            "bin_edges": _floats(cal.bin_edges), "count": [int(x) for x in cal.count],
            "confidence": _floats(cal.confidence), "precision": _floats(cal.precision),
        }
    else:
        calib = {"D-ECE": None, "iou_thr": 0.5, "note": cal_note, "count": [0] * bins}
    return {
        "units": "fraction",
        "iou_type": iou_type,
        "results": str(results_json) if isinstance(results_json, (str, Path)) else "(list)",
        "annotations": str(annotations_json) if isinstance(annotations_json, (str, Path)) else "(COCO object)",
        "num_images": len(p.img_ids),
        "num_gt": int(p.num_gts),
        "num_crowd": int(p.gt_crowd.sum()),
        "num_detections": int(p.num_dets + p.n_uncounted),
        "num_detections_uncounted": int(p.n_uncounted),
        "num_detections_counted": int(counted.sum()),
        "max_dets": MAX_DETS,
        "summary": summary,
        "tide": {"t_f": float(tr.t_f), "t_b": float(tr.t_b), "AP50": tr.ap50, "dAP": tr.dap,
                 "counts": tr.counts,
                 "per_category_AP50": {names[c]: float(v) for c, v in enumerate(tr.per_category_ap50)
                                       if np.isfinite(v)}},
        "calibration": calib,
        "per_category": per_cat,
        "pr_by_size": pr_sizes,
        "confusion": {"categories": names, "rows": "ground truth (+ background)", "columns":
                      "predicted (+ missed)", "matrix": cm.tolist(), "top_confusions": pairs[:20]},
        "worst_images": worst_rows,
        "image_AP50_gain": {str(int(i)): float(g) for i, g in zip(p.img_ids, gains)},
    }


"""COCO's matching and AP, vectorised: the ground on which the analysis stands.

This reproduces, for one IoU threshold and one area range at ``maxDets=100``, what pycocotools'
``COCOeval.evaluateImg`` + ``accumulate`` compute, so that the analysis' base AP *is* pycocotools'
number (tested bit for bit against ``COCOeval.eval["precision"]``):

* detections: per image and category, the 100 highest-scoring (stable sort on ``-score``: ties keep
  the results file's order) are evaluated, the rest are not counted at all;
* IoU: ``maskApi.c``'s box IoU with the same floating-point operations (boxes ``[x, y, w, h]``; a
  crowd's IoU is intersection / detection area), or ``pycocotools.mask.iou`` for masks;
* greedy matching per (image, category), detections in score order: each takes the unmatched
  non-ignored ground truth of highest IoU ``>= min(t, 1 - 1e-10)`` (equal IoUs: the later annotation
  in the file); failing that, the best ignored one (a crowd, matchable any number of times, or a
  ground truth outside the area range, matchable once), which makes the detection *ignored*; an
  unmatched detection outside the area range is ignored too;
* AP: per category, the non-ignored detections of all images sorted by ``-score`` (ties: image id,
  then the per-image order), precision made monotone from the right and read at the 101 recall
  points (``searchsorted`` on recall, ``side="left"``), ``tp / (tp + fp + eps)`` with pycocotools'
  ``eps = np.spacing(1)``; categories without non-ignored ground truth have no AP (-1) and are left
  out of the mean.

The greedy matching is sequential inside one (image, category) group but independent across groups:
it runs in rounds, each round resolving the earliest still-undecided detection of every group at
once (rounds = the largest number of matches in one group), with numpy over all groups.

Layouts: ``[N, 4]`` boxes are COCO ``[x, y, width, height]`` in pixels (float64); every per-detection
array is in *evaluation order* (sorted by image, category, ``-score``, results index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "AREA_RANGES",
    "MAX_DETS",
    "REC_THRS",
    "Matching",
    "Problem",
    "average_precision",
    "build_problem",
    "category_precision",
    "match",
]

REC_THRS: np.ndarray = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)
"""pycocotools' 101 recall points (computed as it computes them, so the floats are identical)."""

AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0**2, 1e5**2), "small": (0.0**2, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e5**2),
}  # fmt: skip
"""pycocotools' area ranges (inclusive at both ends), in square pixels."""

MAX_DETS = 100
_EPS = np.spacing(1)


@dataclass
class Problem:
    """Ground truth and detections as flat arrays, plus every same-image (detection, gt) IoU.

    Attributes:
        img_ids: ``[I]`` the evaluated image ids, ascending; ``*_img`` arrays index into it.
        cat_ids: ``[K]`` the annotations' category ids, ascending; ``*_cat`` arrays index into it.
        gt_img, gt_cat: ``[G]`` per ground truth, sorted by image then file order.
        gt_area: ``[G]`` the annotations' ``area``.
        gt_crowd: ``[G]`` bool, ``iscrowd``.
        gt_ann_id: ``[G]`` annotation ids.
        dt_img, dt_cat, dt_score, dt_area: ``[D]`` per evaluated detection (evaluation order).
        dt_index: ``[D]`` the detection's index in the results list.
        pair_dt, pair_gt, pair_iou: ``[P]`` every (detection, gt) pair of the same image, detection-major
            (a detection's pairs are contiguous, its gts in file order); crowd IoU for crowd gts.
        dt_pair_start, dt_pair_count: ``[D]`` where each detection's pairs are in the pair arrays.
        pair_same: ``[P]`` bool, detection and gt of the same category.
        dt_rank: ``[D]`` rank in ``accumulate``'s order regardless of category (``-score``, image, evaluation
            order): sorting by (category, rank) is that order.
        n_uncounted: detections beyond the 100 best of their image and category (not evaluated).
    """

    img_ids: np.ndarray
    cat_ids: np.ndarray
    gt_img: np.ndarray
    gt_cat: np.ndarray
    gt_area: np.ndarray
    gt_crowd: np.ndarray
    gt_ann_id: np.ndarray
    dt_img: np.ndarray
    dt_cat: np.ndarray
    dt_score: np.ndarray
    dt_area: np.ndarray
    dt_index: np.ndarray
    pair_dt: np.ndarray
    pair_gt: np.ndarray
    pair_iou: np.ndarray
    dt_pair_start: np.ndarray
    dt_pair_count: np.ndarray
    pair_same: np.ndarray
    dt_rank: np.ndarray
    n_uncounted: int

    @property
    def num_dets(self) -> int:
        return int(self.dt_img.size)

    @property
    def num_gts(self) -> int:
        return int(self.gt_img.size)


def box_iou_pairs(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of paired boxes, with ``maskApi.c``'s floating-point operations (bit-identical to it).

    Args:
        dt: ``[P, 4]`` detection boxes ``[x, y, w, h]``, float64.
        gt: ``[P, 4]`` ground-truth boxes, float64.
        crowd: ``[P]`` bool; where true the IoU is intersection / detection area (COCO's crowd rule).

    Returns:
        ``[P]`` float64 IoU (0 where the boxes do not overlap).
    """
    da = dt[:, 2] * dt[:, 3]
    ga = gt[:, 2] * gt[:, 3]
    w = np.minimum(dt[:, 2] + dt[:, 0], gt[:, 2] + gt[:, 0]) - np.maximum(dt[:, 0], gt[:, 0])
    h = np.minimum(dt[:, 3] + dt[:, 1], gt[:, 3] + gt[:, 1]) - np.maximum(dt[:, 1], gt[:, 1])
    inter = w * h
    union = np.where(crowd, da, da + ga - inter)
    out = np.zeros(len(dt))
    ok = (w > 0) & (h > 0)
    np.divide(inter, union, out=out, where=ok)
    return out


def build_problem(
    gt_anns: Sequence[dict[str, Any]],
    img_ids: Sequence[int],
    cat_ids: Sequence[int],
    results: Sequence[dict[str, Any]],
    iou_type: str,
    *,
    mask_iou: Callable[[list[Any], list[Any], list[int]], np.ndarray] | None = None,
    gt_segm: Callable[[dict[str, Any]], Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Problem:
    """Flattens validated ground truth and results into a :class:`Problem`.

    Args:
        gt_anns: The annotations of the evaluated images (file order).
        img_ids: The evaluated image ids.
        cat_ids: The annotations' category ids.
        results: Validated results (ids known, scores finite, ``bbox`` or RLE ``segmentation``).
        iou_type: ``"bbox"`` or ``"segm"``.
        mask_iou: For segm, ``pycocotools.mask.iou``.
        gt_segm: For segm, annotation -> RLE (``COCO.annToRLE``).
        progress: Called with a stage name as the work advances (for a progress display).

    Returns:
        The problem; detections beyond the 100 best per image and category are dropped (counted in
        ``n_uncounted``).
    """
    img_ids = np.asarray(sorted(int(i) for i in img_ids), dtype=np.int64)
    cat_ids = np.asarray(sorted(int(c) for c in cat_ids), dtype=np.int64)
    img_pos = {int(i): n for n, i in enumerate(img_ids)}
    cat_pos = {int(c): n for n, c in enumerate(cat_ids)}

    anns = [a for a in gt_anns if a["image_id"] in img_pos and a["category_id"] in cat_pos]
    g_img = np.fromiter((img_pos[a["image_id"]] for a in anns), np.int64, len(anns))
    g_order = np.argsort(g_img, kind="stable")  # by image, file order inside an image
    anns = [anns[i] for i in g_order]
    g_img = g_img[g_order]
    g_cat = np.fromiter((cat_pos[a["category_id"]] for a in anns), np.int64, len(anns))
    g_area = np.fromiter((float(a["area"]) for a in anns), np.float64, len(anns))
    g_crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, len(anns))
    g_id = np.fromiter((int(a.get("id", 0)) for a in anns), np.int64, len(anns))

    n = len(results)
    # ids were validated against the annotations: a binary search maps them to positions
    d_img = np.searchsorted(img_ids, np.fromiter((r["image_id"] for r in results), np.int64, n))
    d_cat = np.searchsorted(cat_ids, np.fromiter((r["category_id"] for r in results), np.int64, n))
    d_score = np.fromiter((float(r["score"]) for r in results), np.float64, n)
    if progress:
        progress("read")
    # evaluation order: image, category, -score, results index (pycocotools' stable sort)
    order = np.lexsort((np.arange(n), -d_score, d_cat, d_img))
    d_img, d_cat, d_score = d_img[order], d_cat[order], d_score[order]
    group = d_img * len(cat_ids) + d_cat
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1] if n else np.zeros(0, np.int64)
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    keep = rank < MAX_DETS
    order, d_img, d_cat, d_score = order[keep], d_img[keep], d_cat[keep], d_score[keep]
    n_uncounted = int(n - keep.sum())

    if iou_type == "bbox":
        d_box = np.asarray([results[i]["bbox"] for i in order.tolist()], dtype=np.float64).reshape(-1, 4)
        d_area = d_box[:, 2] * d_box[:, 3]  # loadRes' area of a box result
    else:
        from pycocotools import mask as mask_util

        d_rle = [results[i]["segmentation"] for i in order.tolist()]
        d_area = np.asarray(mask_util.area(d_rle), dtype=np.float64).reshape(-1) if d_rle else np.zeros(0)

    # every (detection, gt) pair of the same image, detection-major
    n_img = len(img_ids)
    g_count = np.bincount(g_img, minlength=n_img)
    g_start = np.r_[0, np.cumsum(g_count)[:-1]]
    per_dt = g_count[d_img]
    pair_start = np.r_[0, np.cumsum(per_dt)[:-1]] if len(per_dt) else np.zeros(0, np.int64)
    total = int(per_dt.sum())
    pair_dt = np.repeat(np.arange(len(d_img)), per_dt)
    pair_gt = np.arange(total) - np.repeat(pair_start, per_dt) + np.repeat(g_start[d_img], per_dt)
    if progress:
        progress("pairs")
    if iou_type == "bbox":
        g_box = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        pair_iou = np.empty(total)
        step = 1 << 21  # bounded temporaries
        for s in range(0, total, step):
            sl = slice(s, s + step)
            pair_iou[sl] = box_iou_pairs(d_box[pair_dt[sl]], g_box[pair_gt[sl]], g_crowd[pair_gt[sl]])
    else:
        if mask_iou is None or gt_segm is None:
            raise ValueError("segm analysis needs mask_iou and gt_segm")
        g_rle = [gt_segm(a) for a in anns]
        pair_iou = np.empty(total)
        d_start = np.r_[0, np.cumsum(np.bincount(d_img, minlength=n_img))]
        for i in np.flatnonzero((g_count > 0) & (np.diff(d_start) > 0)).tolist():
            ds, de, gs = d_start[i], d_start[i + 1], g_start[i]
            ious = np.asarray(mask_iou(d_rle[ds:de], g_rle[gs:gs + g_count[i]],
                                       [int(c) for c in g_crowd[gs:gs + g_count[i]]]), dtype=np.float64)
            p0 = pair_start[ds]
            pair_iou[p0:p0 + ious.size] = ious.reshape(-1)
    rank = np.empty(len(d_img), np.int64)
    rank[np.lexsort((np.arange(len(d_img)), d_img, -d_score))] = np.arange(len(d_img))
    return Problem(
        img_ids=img_ids, cat_ids=cat_ids, gt_img=g_img, gt_cat=g_cat, gt_area=g_area, gt_crowd=g_crowd,
        gt_ann_id=g_id, dt_img=d_img, dt_cat=d_cat, dt_score=d_score, dt_area=d_area, dt_index=order,
        pair_dt=pair_dt, pair_gt=pair_gt, pair_iou=pair_iou, dt_pair_start=pair_start, dt_pair_count=per_dt,
        pair_same=d_cat[pair_dt] == g_cat[pair_gt], dt_rank=rank, n_uncounted=n_uncounted,
    )


@dataclass
class Matching:
    """The outcome of :func:`match` at one IoU threshold and area range.

    Attributes:
        dt_match: ``[D]`` the matched gt index (a TP), or -1.
        dt_ignored: ``[D]`` bool: matched to an ignored gt (crowd / outside the area range), or
            unmatched and outside the area range; neither TP nor FP.
        gt_matched: ``[G]`` bool: matched by a TP.
        gt_ignored: ``[G]`` bool: crowd or outside the area range (not counted in recall).
    """

    dt_match: np.ndarray
    dt_ignored: np.ndarray
    gt_matched: np.ndarray
    gt_ignored: np.ndarray

    @property
    def dt_tp(self) -> np.ndarray:
        return self.dt_match >= 0

    @property
    def dt_fp(self) -> np.ndarray:
        return (self.dt_match < 0) & ~self.dt_ignored


def _greedy(e_dt: np.ndarray, e_gt: np.ndarray, e_iou: np.ndarray, dt_group: np.ndarray,
            reusable: np.ndarray, n_dt: int) -> np.ndarray:
    """Greedy matching over candidate edges; returns ``[n_dt]`` the matched gt (or -1).

    Edges must be sorted by (detection, gt); a detection's turn comes in detection-index order inside
    its group; ``reusable`` gts (crowds) are never used up.
    """
    match = np.full(n_dt, -1, np.int64)
    taken = np.zeros(len(reusable), bool)
    while e_dt.size:
        grp = dt_group[e_dt]
        first = np.r_[True, grp[1:] != grp[:-1]]
        chosen = np.zeros(n_dt, bool)
        chosen[e_dt[first]] = True
        sel = chosen[e_dt]
        c_dt, c_gt, c_iou = e_dt[sel], e_gt[sel], e_iou[sel]
        # best IoU per detection; equal IoUs: the later gt (pycocotools replaces on >=)
        order = np.lexsort((c_gt, c_iou, c_dt))
        c_dt, c_gt = c_dt[order], c_gt[order]
        last = np.r_[c_dt[1:] != c_dt[:-1], True]
        match[c_dt[last]] = c_gt[last]
        won = c_gt[last]
        taken[won[~reusable[won]]] = True
        keep = ~sel & ~taken[e_gt]
        e_dt, e_gt, e_iou = e_dt[keep], e_gt[keep], e_iou[keep]
    return match


def match(problem: Problem, iou_thr: float = 0.5, area: str = "all") -> Matching:
    """pycocotools' matching at one IoU threshold and area range (see the module docstring).

    Args:
        problem: From :func:`build_problem`.
        iou_thr: The IoU threshold ``t`` (a match needs IoU ``>= min(t, 1 - 1e-10)``).
        area: A key of :data:`AREA_RANGES`.

    Returns:
        The :class:`Matching`.
    """
    lo, hi = AREA_RANGES[area]
    p = problem
    gt_ignored = p.gt_crowd | (p.gt_area < lo) | (p.gt_area > hi)
    thr = min(iou_thr, 1 - 1e-10)
    same = p.pair_same & (p.pair_iou >= thr)
    dt_group = p.dt_img * len(p.cat_ids) + p.dt_cat
    e = np.flatnonzero(same & ~gt_ignored[p.pair_gt])
    dt_match = _greedy(p.pair_dt[e], p.pair_gt[e], p.pair_iou[e], dt_group,
                       np.zeros(p.num_gts, bool), p.num_dets)
    # unmatched detections may still match an ignored gt: they become ignored
    e = np.flatnonzero(same & gt_ignored[p.pair_gt])
    e = e[dt_match[p.pair_dt[e]] < 0]
    ig_match = _greedy(p.pair_dt[e], p.pair_gt[e], p.pair_iou[e], dt_group, p.gt_crowd, p.num_dets)
    outside = (p.dt_area < lo) | (p.dt_area > hi)
    dt_ignored = (ig_match >= 0) | ((dt_match < 0) & outside)
    gt_matched = np.zeros(p.num_gts, bool)
    gt_matched[dt_match[dt_match >= 0]] = True
    return Matching(dt_match=dt_match, dt_ignored=dt_ignored, gt_matched=gt_matched, gt_ignored=gt_ignored)


def category_precision(tp: np.ndarray, npos: int) -> np.ndarray | None:
    """The 101-point interpolated precision of one category, as pycocotools' ``accumulate``.

    Args:
        tp: ``[n]`` bool, the category's counted detections (TP or FP, no ignored ones) sorted by
            ``-score`` (ties: image id, then the per-image order).
        npos: Its number of non-ignored ground truths.

    Returns:
        ``[101]`` precision at :data:`REC_THRS`, or ``None`` when ``npos == 0`` (pycocotools' -1).
        Only the TP positions matter: recall first reaches a recall point at a TP, and the precision
        after an FP is below the one at the TP before it.
    """
    if npos <= 0:
        return None
    q = np.zeros(len(REC_THRS))
    k_pos = np.flatnonzero(tp)
    n_tp = k_pos.size
    if n_tp == 0:
        return q
    tp_sum = np.arange(1, n_tp + 1, dtype=np.float64)
    fp_sum = (k_pos - np.arange(n_tp)).astype(np.float64)  # FPs ranked above each TP
    rc = tp_sum / npos
    pr = tp_sum / (fp_sum + tp_sum + _EPS)
    pr = np.maximum.accumulate(pr[::-1])[::-1]
    inds = np.searchsorted(rc, REC_THRS, side="left")
    ok = inds < n_tp
    q[ok] = pr[inds[ok]]
    return q


def accumulate_order(dt_cat: np.ndarray, dt_rank: np.ndarray) -> np.ndarray:
    """The order in which ``accumulate`` sees detections: category, ``-score``, image, per-image order.

    Args:
        dt_cat: ``[n]`` categories (possibly changed by an oracle).
        dt_rank: ``[n]`` :attr:`Problem.dt_rank` of the same detections.
    """
    return np.argsort(dt_cat * (int(dt_rank.max(initial=0)) + 1) + dt_rank, kind="stable")


def precision_table(dt_cat: np.ndarray, dt_rank: np.ndarray, dt_tp: np.ndarray, counted: np.ndarray,
                    npos: np.ndarray) -> np.ndarray:
    """``[101, K]`` precision (pycocotools' ``precision[t, :, :, a, m]``), -1 for categories without gt.

    Args:
        dt_cat: ``[D]`` category per detection (evaluation order).
        dt_rank: ``[D]`` :attr:`Problem.dt_rank`.
        dt_tp: ``[D]`` bool, TP.
        counted: ``[D]`` bool, counted (TP or FP; false for ignored or suppressed detections).
        npos: ``[K]`` non-ignored gts per category.
    """
    k = len(npos)
    out = -np.ones((len(REC_THRS), k))
    idx = np.flatnonzero(counted)
    order = idx[accumulate_order(dt_cat[idx], dt_rank[idx])]
    cats = dt_cat[order]
    bounds = np.searchsorted(cats, np.arange(k + 1))
    tp = dt_tp[order]
    for c in range(k):
        q = category_precision(tp[bounds[c]:bounds[c + 1]], int(npos[c]))
        if q is not None:
            out[:, c] = q
    return out


def average_precision(precision: np.ndarray) -> float:
    """The mean of the valid entries of a ``[101, K]`` precision table (pycocotools' summarize), -1 if none."""
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def per_category_ap(precision: np.ndarray) -> np.ndarray:
    """``[K]`` AP per category (mean over the recall points), NaN where the category has no gt."""
    out = np.full(precision.shape[1], np.nan)
    valid = (precision > -1).all(axis=0)
    out[valid] = precision[:, valid].mean(axis=0)
    return out

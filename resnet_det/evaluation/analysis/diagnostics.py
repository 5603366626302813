"""Where the AP goes: the category confusion matrix and the images that lose the most AP.

Both work on COCO's matching at IoU 0.5 (area all, the 100 best detections per image and category).

**Confusion matrix** ``[K + 1, K + 1]``: rows are the ground-truth category plus a last
``background`` row, columns the predicted category plus a last ``missed`` column. Every non-crowd
gt of category ``c`` adds 1 to row ``c``: in column ``c`` if a detection matched it; else in column
``c'`` if a false positive of another category ``c'`` covers it at IoU >= 0.5 (the highest-scoring
such detection); else in ``missed``. Every false positive that covers no non-crowd gt at IoU >= 0.5
adds 1 to the ``background`` row in its category's column. (Duplicates, which cover their own
category's matched gt, appear in neither; TIDE counts them.) Row sums are the gts per category.

**Images that lose the most AP**: for each image, the AP50 of the whole set when only that image is
fixed, minus the AP50 as it is: the image's false positives are removed and its missed gts are not
counted (its true positives stay). It is the sum over categories of TIDE's FP + FN oracles applied to
one image, is never negative, and is exact (pycocotools' 101-point AP, computed for every image at
once per category rather than by re-running the evaluation 5,000 times).
"""

from __future__ import annotations

import numpy as np

from .matching import REC_THRS, Matching, Problem, accumulate_order, category_precision

__all__ = ["confusion_matrix", "image_ap_gains"]

_EPS = np.spacing(1)


def confusion_matrix(problem: Problem, m: Matching, *, iou_thr: float = 0.5) -> np.ndarray:
    """The ``[K + 1, K + 1]`` category confusion matrix (see the module docstring).

    Args:
        problem: The flattened problem.
        m: The matching at ``iou_thr``, area all.
        iou_thr: The IoU at which a detection "covers" a gt.

    Returns:
        int64 counts; row ``K`` is background, column ``K`` is missed.
    """
    p = problem
    k = len(p.cat_ids)
    out = np.zeros((k + 1, k + 1), np.int64)
    real = ~p.gt_crowd
    hit = real & m.gt_matched
    np.add.at(out, (p.gt_cat[hit], p.gt_cat[hit]), 1)

    fp = ~m.dt_tp & ~m.dt_ignored
    pd, pg, iou = p.pair_dt, p.pair_gt, p.pair_iou
    cover = (iou >= iou_thr) & real[pg]
    sel = np.flatnonzero(cover & fp[pd] & ~m.gt_matched[pg] & (p.dt_cat[pd] != p.gt_cat[pg]))
    order = sel[np.lexsort((pd[sel], -p.dt_score[pd[sel]], pg[sel]))]
    g = pg[order]
    first = np.r_[True, g[1:] != g[:-1]] if order.size else np.zeros(0, bool)
    conf_gt, conf_dt = g[first], pd[order[first]]
    np.add.at(out, (p.gt_cat[conf_gt], p.dt_cat[conf_dt]), 1)
    missed = real & ~m.gt_matched
    missed[conf_gt] = False
    np.add.at(out, (p.gt_cat[missed], k), 1)

    covers_any = np.zeros(p.num_dets, bool)
    covers_any[pd[cover]] = True
    bg = fp & ~covers_any
    np.add.at(out, (k, p.dt_cat[bg]), 1)
    return out


def _first_reaching(npos: np.ndarray, n_tp: int) -> np.ndarray:
    """``[rows, 101]``: for each row's ``npos``, how many of ``k = 1..n_tp`` have ``k / npos < r``
    (pycocotools' ``searchsorted(recall, r, "left")``, with its floating-point comparisons)."""
    npos = npos.astype(np.float64)[:, None]
    r = REC_THRS[None, :]
    e = np.clip(np.ceil(r * npos) - 1, 0, n_tp).astype(np.int64)
    for _ in range(2):  # r * npos is within an ulp of exact: one step either way settles it
        up = (e < n_tp) & ((e + 1) / npos < r)
        e = e + up
        down = (e > 0) & (e / npos >= r)
        e = e - down
    return e


def image_ap_gains(problem: Problem, m: Matching, *, max_cells: int = 1 << 22) -> np.ndarray:
    """``[I]`` AP50 gained by fixing each image alone (see the module docstring).

    Args:
        problem: The flattened problem.
        m: The matching at IoU 0.5, area all.
        max_cells: Bound of the ``[images, TPs]`` work arrays per step (memory).

    Returns:
        float64 gains (fractions of AP), one per image of ``problem.img_ids``.
    """
    p = problem
    k = len(p.cat_ids)
    n_img = len(p.img_ids)
    gains = np.zeros(n_img)
    npos = np.bincount(p.gt_cat[~m.gt_ignored], minlength=k)
    n_valid = int((npos > 0).sum())
    if n_valid == 0:
        return gains
    idx = np.flatnonzero(~m.dt_ignored)
    order = idx[accumulate_order(p.dt_cat[idx], p.dt_rank[idx])]
    bounds = np.searchsorted(p.dt_cat[order], np.arange(k + 1))
    fn = ~m.gt_matched & ~m.gt_ignored
    for c in np.flatnonzero(npos > 0).tolist():
        seg = order[bounds[c]:bounds[c + 1]]
        tp = m.dt_tp[seg]
        n_tp = int(tp.sum())
        if n_tp == 0:
            continue  # no TP in this category: fixing one image leaves its AP at 0
        base = category_precision(tp, int(npos[c])).sum()
        img = p.dt_img[seg]
        tp_sum = np.arange(1, n_tp + 1, dtype=np.float64)
        fp_before = (np.flatnonzero(tp) - np.arange(n_tp)).astype(np.float64)
        fp_at = np.flatnonzero(~tp)
        fp_k = np.cumsum(tp)[fp_at]  # TPs ranked above each FP: it lowers TP number fp_k and after
        early = fp_k < n_tp
        fp_img, fp_k = img[fp_at][early], fp_k[early]
        miss = np.bincount(p.gt_img[fn & (p.gt_cat == c)], minlength=n_img)
        rows = np.union1d(fp_img, np.flatnonzero(miss))
        row_of = np.full(n_img, -1, np.int64)
        step = max(1, max_cells // (n_tp + 1))
        for s in range(0, rows.size, step):
            chunk = rows[s:s + step]
            row_of[chunk] = np.arange(chunk.size)
            inside = row_of[fp_img] >= 0
            flat = row_of[fp_img[inside]] * n_tp + fp_k[inside]
            delta = np.bincount(flat, minlength=chunk.size * n_tp).reshape(chunk.size, n_tp)
            fp_left = fp_before[None, :] - np.cumsum(delta, axis=1)
            pr = tp_sum / (fp_left + tp_sum + _EPS)
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
            e = _first_reaching(npos[c] - miss[chunk], n_tp)
            q = np.where(e < n_tp, np.take_along_axis(pr, np.minimum(e, n_tp - 1), axis=1), 0.0)
            gains[chunk] += q.sum(axis=1) - base
            row_of[chunk] = -1
    return gains / (len(REC_THRS) * n_valid)

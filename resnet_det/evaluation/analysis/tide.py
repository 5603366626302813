"""TIDE's error breakdown (Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection
Errors", ECCV 2020), on COCO's own matching.

Every counted detection that is not a true positive of pycocotools' matching at ``t_f`` (area all,
100 detections per image and category; crowd-ignored detections are neither TP nor error) gets one
error type, decided in the order of the authors' implementation (``tidecv``), from its IoU with the
non-crowd ground truth of its image:

====  =====================================================================================
Loc   the best IoU with a gt of its class is in ``[t_b, t_f]``
Cls   else the best IoU with a gt of another class is ``>= t_f``
Dupe  else the best IoU with an already-matched gt of its class is ``>= t_f``
Bkg   else the best IoU with any gt is ``<= t_b``
Both  otherwise (a gt of another class at IoU in ``(t_b, t_f)``)
Miss  a gt that is not matched and is not the target of a Cls or Loc error
====  =====================================================================================

Each error type's dAP is the AP50 after applying its *oracle* alone, minus the base AP50:

* Cls / Loc: the error detection becomes a TP of its target gt (the best-IoU gt of the test above;
  for Cls the detection takes that gt's class). A target already matched by a TP, or claimed by a
  higher-scoring error *of the same type* (equal scores: the earlier one in the results), makes the
  detection a duplicate, which is suppressed (removed);
* Both, Dupe, Bkg: the error detections are suppressed;
* Miss: the missed gts are removed from the ground truth;
* FP (special): every false positive is suppressed (perfect precision, same recall);
* FN (special): every unmatched gt is removed (perfect recall, same precision).

AP is pycocotools' (101 points, the mean over the categories that have ground truth in the base
evaluation). A category left without ground truth by an oracle keeps its place in the mean with
AP 0 (it has no TP: every one of its gts was missed). Oracles never lower AP, so no clipping.

Where the authors' ``tidecv`` 1.0.1 differs (each measured in ``tests/evaluation/test_analysis.py``):
its per-class AP is the same 101-point interpolation (equal to 1e-12: it has no ``eps`` in the
precision), and the error type of every detection is the same, but

* its mean runs over every class with a detection or a gt: classes with only false positives count
  as AP 0 (so its AP50 is below pycocotools', dbolya/tide#14), and a class an oracle empties leaves
  the mean (so suppressing the false positives of such classes *raises* its AP); re-averaged that
  way, our per-category results give its dAP to 1e-12;
* its FP oracle rescores false positives to 0 instead of removing them (same AP, but the class stays
  in its mean);
* it keeps the 100 best detections per image, COCO the 100 best per image and category;
* a detection matched to a crowd is ignored by both for AP, but tidecv still gives it an error type
  (and its Cls / Loc oracle can turn it into a TP); its crowd test is ``IoU > t_f``, COCO's ``>=``;
* its Cls and Loc oracles share the "best detection per gt" bookkeeping, so a Cls error can lose its
  gt to a higher-scoring Loc error that the Cls oracle does not fix (the paper fixes one type at a
  time; here only errors of the same type compete).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .matching import Matching, Problem, average_precision, per_category_ap, precision_table

__all__ = ["ERROR_TYPES", "SPECIAL_ERROR_TYPES", "Oracle", "TideResult", "classify_errors", "tide_breakdown"]

ERROR_TYPES: tuple[str, ...] = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
"""The six main error types, in the paper's (and tidecv's) order."""
SPECIAL_ERROR_TYPES: tuple[str, ...] = ("FP", "FN")

# per-detection labels
TP, IGNORED, UNCOUNTED = -1, -2, -3
_LABEL = {"Loc": 0, "Cls": 1, "Dupe": 2, "Bkg": 3, "Both": 4}


@dataclass
class Classified:
    """Per-detection error labels and targets.

    Attributes:
        label: ``[D]`` ``TP`` (-1), ``IGNORED`` (-2) or an error code (``_LABEL``).
        target: ``[D]`` the target gt of a Loc / Cls error (else -1).
        missed: ``[G]`` bool, Miss errors.
        max_iou_any: ``[D]`` best IoU with any non-crowd gt of the image.
    """

    label: np.ndarray
    target: np.ndarray
    missed: np.ndarray
    max_iou_any: np.ndarray


def _segment_max(values: np.ndarray, start: np.ndarray, count: np.ndarray, fill: float) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """Per segment (contiguous ``values[start:start+count]``): max and the first index reaching it."""
    n = start.size
    best = np.full(n, fill)
    arg = np.full(n, -1, np.int64)
    has = count > 0
    if not has.any() or values.size == 0:
        return best, arg
    s = start[has]
    best[has] = np.maximum.reduceat(values, s)
    seg = np.repeat(np.arange(n), count)
    eq = values == best[seg]
    idx = np.where(eq, np.arange(values.size), values.size)
    arg[has] = np.minimum.reduceat(idx, s)
    return best, arg


def classify_errors(problem: Problem, m: Matching, *, t_f: float = 0.5, t_b: float = 0.1) -> Classified:
    """Gives each counted non-TP detection its TIDE error type (see the module docstring).

    Args:
        problem: The flattened problem.
        m: pycocotools' matching at ``t_f``, area all.
        t_f: Foreground IoU threshold.
        t_b: Background IoU threshold.

    Returns:
        The per-detection labels, Loc / Cls targets and the missed gts.
    """
    p = problem
    pd, pg, iou = p.pair_dt, p.pair_gt, p.pair_iou
    real = ~p.gt_crowd[pg]
    same = p.dt_cat[pd] == p.gt_cat[pg]
    start, count = p.dt_pair_start, p.dt_pair_count
    s_iou, s_arg = _segment_max(np.where(real & same, iou, 0.0), start, count, 0.0)
    o_iou, o_arg = _segment_max(np.where(real & ~same, iou, 0.0), start, count, 0.0)
    u_iou, _ = _segment_max(np.where(real & same & m.gt_matched[pg], iou, 0.0), start, count, 0.0)
    a_iou, _ = _segment_max(np.where(real, iou, 0.0), start, count, 0.0)

    label = np.full(p.num_dets, TP, np.int64)
    label[m.dt_ignored] = IGNORED
    err = ~m.dt_tp & ~m.dt_ignored
    loc = err & (s_iou >= t_b) & (s_iou <= t_f)
    cls = err & ~loc & (o_iou >= t_f)
    dupe = err & ~loc & ~cls & (u_iou >= t_f)
    bkg = err & ~loc & ~cls & ~dupe & (a_iou <= t_b)
    both = err & ~loc & ~cls & ~dupe & ~bkg
    for name, mask in (("Loc", loc), ("Cls", cls), ("Dupe", dupe), ("Bkg", bkg), ("Both", both)):
        label[mask] = _LABEL[name]
    target = np.full(p.num_dets, -1, np.int64)
    target[loc] = pg[s_arg[loc]]
    target[cls] = pg[o_arg[cls]]

    claimed = np.zeros(p.num_gts, bool)
    t = target[target >= 0]
    claimed[t[~m.gt_matched[t]]] = True
    missed = ~m.gt_matched & ~m.gt_ignored & ~claimed
    return Classified(label=label, target=target, missed=missed, max_iou_any=a_iou)


@dataclass
class TideResult:
    """TIDE's numbers (fractions, like every metric of this project).

    Attributes:
        ap50: The base AP50 (pycocotools' ``stats[1]``).
        dap: ``{type: dAP}`` for the six main types and ``FP``/``FN``.
        counts: ``{type: number of errors}`` (detections; gts for Miss; FP = all false positives,
            FN = all unmatched gts).
        per_category_ap50: ``[K]`` base AP50 per category (NaN without gt).
        classified: The per-detection labels.
        oracles: ``{"base" | type: Oracle}``, what each oracle left, per category.
        t_f, t_b: The thresholds used.
    """

    ap50: float
    dap: dict[str, float]
    counts: dict[str, int]
    per_category_ap50: np.ndarray
    classified: Classified = field(repr=False)
    oracles: dict[str, Oracle] = field(repr=False, default_factory=dict)
    t_f: float = 0.5
    t_b: float = 0.1


@dataclass
class Oracle:
    """The state after one oracle, per category.

    Attributes:
        precision: ``[101, K]`` the interpolated precision (-1: not in the mean).
        num_dets: ``[K]`` counted detections left.
        num_gts: ``[K]`` non-ignored gts left.
    """

    precision: np.ndarray
    num_dets: np.ndarray
    num_gts: np.ndarray


def _fix_target(label: np.ndarray, target: np.ndarray, score: np.ndarray, code: int,
                gt_matched: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one of Loc / Cls: which error detections become TPs (one per unmatched target, the
    highest-scoring; equal scores: the earlier in evaluation order) and which are suppressed."""
    idx = np.flatnonzero(label == code)
    free = idx[~gt_matched[target[idx]]]
    # highest score first, then evaluation order; the first per target wins
    order = free[np.lexsort((free, -score[free], target[free]))]
    tg = target[order]
    first = np.r_[True, tg[1:] != tg[:-1]] if order.size else np.zeros(0, bool)
    winners = order[first]
    suppressed = np.setdiff1d(idx, winners, assume_unique=True)
    return winners, suppressed


def tide_breakdown(problem: Problem, m: Matching, *, t_f: float = 0.5, t_b: float = 0.1) -> TideResult:
    """TIDE's error breakdown (main and special errors) on COCO's matching ``m`` at ``t_f``.

    Args:
        problem: The flattened problem.
        m: :func:`~.matching.match` at ``t_f``, area all.
        t_f: Foreground IoU threshold (0.5 in the paper).
        t_b: Background IoU threshold (0.1 in the paper).

    Returns:
        The :class:`TideResult`.
    """
    p = problem
    c = classify_errors(p, m, t_f=t_f, t_b=t_b)
    k = len(p.cat_ids)
    counted = ~m.dt_ignored
    npos = np.bincount(p.gt_cat[~m.gt_ignored], minlength=k)
    base_cats = npos > 0  # the categories of the mean, fixed for every oracle

    oracles: dict[str, Oracle] = {}

    def ap(name: str, dt_cat: np.ndarray, dt_tp: np.ndarray, keep: np.ndarray,
           n_pos: np.ndarray) -> tuple[float, np.ndarray]:
        prec = precision_table(dt_cat, p.dt_rank, dt_tp, keep, n_pos)
        prec[:, base_cats & (n_pos == 0)] = 0.0  # emptied by an oracle: AP 0, still in the mean
        oracles[name] = Oracle(precision=prec, num_dets=np.bincount(dt_cat[keep], minlength=k), num_gts=n_pos)
        return average_precision(prec), prec

    base, prec0 = ap("base", p.dt_cat, m.dt_tp, counted, npos)
    dap: dict[str, float] = {}
    for name in ("Cls", "Loc"):
        winners, suppressed = _fix_target(c.label, c.target, p.dt_score, _LABEL[name], m.gt_matched)
        cat = p.dt_cat.copy()
        if name == "Cls":
            cat[winners] = p.gt_cat[c.target[winners]]
        tp = m.dt_tp.copy()
        tp[winners] = True
        keep = counted.copy()
        keep[suppressed] = False
        dap[name] = ap(name, cat, tp, keep, npos)[0] - base
    for name in ("Both", "Dupe", "Bkg"):
        dap[name] = ap(name, p.dt_cat, m.dt_tp, counted & (c.label != _LABEL[name]), npos)[0] - base
    miss_pos = npos - np.bincount(p.gt_cat[c.missed], minlength=k)
    dap["Miss"] = ap("Miss", p.dt_cat, m.dt_tp, counted, miss_pos)[0] - base
    dap["FP"] = ap("FP", p.dt_cat, m.dt_tp, counted & m.dt_tp, npos)[0] - base
    tp_pos = np.bincount(p.dt_cat[m.dt_tp], minlength=k)
    dap["FN"] = ap("FN", p.dt_cat, m.dt_tp, counted, tp_pos)[0] - base

    counts = {name: int((c.label == _LABEL[name]).sum()) for name in ("Cls", "Loc", "Both", "Dupe", "Bkg")}
    counts["Miss"] = int(c.missed.sum())
    counts["FP"] = int(m.dt_fp.sum())
    counts["FN"] = int((~m.gt_matched & ~m.gt_ignored).sum())
    return TideResult(
        ap50=base, dap={t: dap[t] for t in (*ERROR_TYPES, *SPECIAL_ERROR_TYPES)},
        counts={t: counts[t] for t in (*ERROR_TYPES, *SPECIAL_ERROR_TYPES)},
        per_category_ap50=per_category_ap(prec0), classified=c, oracles=oracles, t_f=t_f, t_b=t_b,
    )

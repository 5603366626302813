"""COCO bbox / segm evaluation through pycocotools.

The numbers are pycocotools' own: :class:`COCOEvaluator` and :func:`evaluate_results_json` build the
standard COCO results list, hand it to ``COCO.loadRes`` and run ``COCOeval`` with its default
parameters (10 IoU thresholds 0.50:0.95, 101 recall points, maxDets 1/10/100, the three area
ranges). Nothing is re-implemented; the 12-line summary table reported here is the text that
``COCOeval.summarize()`` printed, captured and logged unchanged.

Metrics are **fractions** in [0, 1] (the numbers of pycocotools' table, not percent). The 12 summary
metrics are returned under detectron2's names, in pycocotools' order::

    AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl   ==   COCOeval.stats[0..11]

so ``[metrics["bbox"][k] for k in METRIC_NAMES]`` *is* the raw ``stats`` array (also kept, as a
list, in :attr:`COCOEvaluator.stats` and in ``metrics.json``). As in pycocotools, ``-1.0`` means
"no ground truth in that setting" (e.g. ``APs`` on a set without small objects); it is not turned
into 0 or NaN. Per-category AP (IoU 0.50:0.95, area all, maxDets 100, as detectron2 computes it)
is returned as ``AP-<category name>`` for every category that has at least one non-crowd ground
truth box among the evaluated images; categories without ground truth have no AP and are left out.

Pitfalls handled (all seen on the pycocotools / detectron2 / torchvision issue trackers):

* ``COCO.loadRes([])`` raises ``IndexError``: with no detections at all the evaluation runs on an
  empty result set instead, which gives AP = AR = 0 where ground truth exists and -1 where a
  setting has none, and a :class:`COCOEvalWarning` is emitted.
* results on image ids that are not in the annotations (pycocotools: "Results do not correspond to
  current coco set") and category ids that are not in the annotations (pycocotools silently drops
  them) raise ``ValueError`` listing a few of the offending ids.
* ground-truth annotation id 0 is never counted as a match by ``COCOeval`` (matches are stored as
  annotation ids and 0 means "unmatched"), and duplicate annotation ids make ``loadAnns`` return
  the wrong objects: when either is found the annotations are renumbered 1..N (on a private copy)
  and a :class:`COCOEvalWarning` says so. Metrics do not depend on annotation ids otherwise.
* ground-truth annotations without ``iscrowd`` (``COCOeval`` raises ``KeyError``) are taken as
  ``iscrowd = 0`` with a warning; annotations without ``area`` raise ``ValueError`` (the area
  decides the small/medium/large split, it is not guessed).
* NaN / inf boxes or scores raise ``ValueError`` naming the image; so do boxes with x2 < x1 or
  y2 < y1 (usually xywh boxes passed as xyxy).
* segm results carry no ``bbox`` key, so ``loadRes`` computes their areas from the masks (with a
  ``bbox`` key it would take the box area); ``COCOeval`` rewrites ground-truth polygons to RLE in
  place, so the evaluator works on a private copy of the annotations and never changes the caller's
  ``COCO`` object.

Warnings go through :func:`warnings.warn` with the category :class:`COCOEvalWarning` (a
``UserWarning``, shown by default). The tables (pycocotools' summary, captured, and the per-category
table) go through ``logging`` (logger ``detection.evaluation.coco``, INFO), so a run's console and
``log.txt`` get them; when INFO logging is off (nothing set up) they are printed to stdout, as
pycocotools prints them (:func:`resnet_det.common.log_report`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import numbers
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from resnet_det.common import all_gather_object, get_world_size, is_main_process, log_report, writing

from .evaluator import DatasetEvaluator

__all__ = [
    "IOU_TYPES",
    "METRICS_FILENAME",
    "METRIC_NAMES",
    "RESULTS_FILENAME",
    "COCOEvalWarning",
    "COCOEvaluator",
    "encode_masks",
    "evaluate_results_json",
    "format_category_table",
    "instances_to_coco_json",
    "load_coco_gt",
    "load_results_json",
]

IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
"""The iou types this module evaluates."""

METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
"""Names of ``COCOeval.stats[0..11]``, in that order (detectron2's keys)."""

RESULTS_FILENAME = "coco_instances_results.json"
METRICS_FILENAME = "metrics.json"
MASK_THRESHOLD = 0.5
"""Floating-point masks are foreground where ``mask > MASK_THRESHOLD`` (torchvision's rule)."""

_MAX_LISTED = 5  # how many offending ids an error message lists
_log = logging.getLogger(__name__)


class COCOEvalWarning(UserWarning):
    """Warnings of the COCO evaluation (empty predictions, repaired annotations, subsets)."""


def _warn(message: str) -> None:
    warnings.warn(message, COCOEvalWarning, stacklevel=3)


def _few(ids: Iterable[Any]) -> str:
    """Formats up to ``_MAX_LISTED`` ids (sorted) and how many more there are."""
    ids = sorted(set(ids), key=lambda x: (str(type(x)), x))
    shown = ", ".join(repr(i) for i in ids[:_MAX_LISTED])
    more = len(ids) - _MAX_LISTED
    return f"[{shown}{f', ... ({more} more)' if more > 0 else ''}]"


# ----------------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------------


def _check_iou_types(iou_types: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(iou_types, str):
        iou_types = (iou_types,)
    types = tuple(dict.fromkeys(iou_types))
    if not types:
        raise ValueError(f"iou_types is empty; pass one or more of {IOU_TYPES}")
    bad = [t for t in types if t not in IOU_TYPES]
    if bad:
        raise ValueError(f"unsupported iou type(s) {bad}; this evaluator supports {IOU_TYPES}")
    return types


def _quiet_coco(dataset: dict[str, Any]) -> COCO:
    """Builds a ``COCO`` object from a dataset dict without pycocotools' prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} file {path} is not valid JSON ({e})") from None


def _prepare_gt_dataset(dataset: Any, source: str, iou_types: Sequence[str]) -> dict[str, Any]:
    """Validates a COCO instances dict and repairs what can be repaired (in place; pass a copy)."""
    if not isinstance(dataset, dict):
        raise ValueError(
            f"{source}: expected a COCO instances JSON object with 'images', 'annotations' and "
            f"'categories', got a {type(dataset).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(
                f"{source}: no '{key}' list; ground truth must be a COCO instances file "
                "(an image-info-only file such as test-dev cannot be evaluated locally)"
            )
    if not dataset["images"]:
        raise ValueError(f"{source}: 'images' is empty; there is nothing to evaluate on")
    if not dataset["categories"]:
        raise ValueError(f"{source}: 'categories' is empty")

    required = ["image_id", "category_id", "area"]
    if "bbox" in iou_types:
        required.append("bbox")
    if "segm" in iou_types:
        required.append("segmentation")
        no_size = [img.get("id") for img in dataset["images"] if "height" not in img or "width" not in img]
        if no_size:
            raise ValueError(
                f"{source}: images {_few(no_size)} have no 'height'/'width'; segm evaluation needs "
                "them to rasterise the ground-truth polygons"
            )
    anns = dataset["annotations"]
    no_crowd = 0
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise ValueError(f"{source}: annotation #{i} is a {type(ann).__name__}, not an object")
        for key in required:
            if key not in ann:
                raise ValueError(
                    f"{source}: annotation #{i} (id {ann.get('id')!r}, image {ann.get('image_id')!r}) "
                    f"has no '{key}'; COCO {'/'.join(iou_types)} evaluation needs "
                    f"{', '.join(repr(k) for k in required)} on every annotation"
                )
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            no_crowd += 1
    if no_crowd:
        _warn(f"{source}: {no_crowd} annotation(s) have no 'iscrowd'; they are taken as iscrowd=0")

    ids = [ann.get("id") for ann in anns]
    n_missing = sum(i is None for i in ids)
    n_zero = sum(i == 0 for i in ids if i is not None)
    n_dup = len(ids) - n_missing - len({i for i in ids if i is not None})
    if n_missing or n_zero or n_dup:
        problems = []
        if n_zero:
            problems.append(f"{n_zero} with id 0 (COCOeval never counts a match to annotation id 0)")
        if n_dup:
            problems.append(f"{n_dup} duplicate id(s)")
        if n_missing:
            problems.append(f"{n_missing} without an id")
        _warn(
            f"{source}: annotation ids are unusable for COCOeval ({'; '.join(problems)}); the "
            "annotations were renumbered 1..N for this evaluation (metrics are unaffected otherwise). "
            "Fix the file to silence this warning: give every annotation a unique id >= 1"
        )
        for n, ann in enumerate(anns, start=1):
            ann["id"] = n
    return dataset


def load_coco_gt(coco_gt: COCO | str | Path, *, iou_types: str | Iterable[str] = ("bbox",)) -> COCO:
    """Loads (or copies) ground truth and validates it for COCO evaluation.

    Args:
        coco_gt: A pycocotools ``COCO`` object (deep-copied: ``COCOeval`` rewrites polygons to RLE
            in place, the caller's object is left alone) or the path to an instances JSON file.
        iou_types: The iou types that will be evaluated; ``"segm"`` additionally requires
            ``segmentation`` on annotations and ``height``/``width`` on images.

    Returns:
        A private ``COCO`` object, repaired as described in the module docstring.

    Raises:
        FileNotFoundError: ``coco_gt`` is a path that does not exist.
        ValueError: The file is not JSON or not a usable COCO instances file.
        TypeError: ``coco_gt`` is neither a ``COCO`` nor a path.
    """
    iou_types = _check_iou_types(iou_types)
    if isinstance(coco_gt, COCO):
        dataset = copy.deepcopy(coco_gt.dataset)
        source = "ground truth (COCO object)"
    elif isinstance(coco_gt, (str, Path)):
        dataset = _read_json(coco_gt, "annotations")
        source = f"annotations file {coco_gt}"
    else:
        raise TypeError(f"coco_gt must be a pycocotools COCO or a path, got {type(coco_gt).__name__}")
    return _quiet_coco(_prepare_gt_dataset(dataset, source, iou_types))


def _category_names(
    coco_gt: COCO,
    class_names: Mapping[int, str] | Sequence[str] | None,
    label_to_cat_id: Mapping[int, int] | None = None,
) -> dict[int, str]:
    """Category id -> display name (see ``COCOEvaluator``'s ``class_names`` for the accepted forms)."""
    cat_ids = sorted(coco_gt.getCatIds())
    names = {c: str(coco_gt.cats[c].get("name", c)) for c in cat_ids}
    if class_names is None:
        return names
    if isinstance(class_names, Mapping):
        unknown = [c for c in class_names if c not in names]
        if unknown:
            raise ValueError(
                f"class_names has category ids {_few(unknown)} that are not in the annotations' "
                f"categories {_few(cat_ids)}"
            )
        names.update({int(c): str(n) for c, n in class_names.items()})
        return names
    seq = [str(n) for n in class_names]
    if len(seq) == len(cat_ids):  # one per category, ascending id (= contiguous labels 1..K)
        return dict(zip(cat_ids, seq))
    if label_to_cat_id and len(seq) > max(label_to_cat_id):  # indexed by label, [0] = background
        names.update({c: seq[lab] for lab, c in label_to_cat_id.items()})
        return names
    if not label_to_cat_id and len(seq) > max(cat_ids):  # indexed by category id (torchvision's 91)
        names.update({c: seq[c] for c in cat_ids})
        return names
    raise ValueError(
        f"class_names has {len(seq)} names for {len(cat_ids)} categories (ids up to {max(cat_ids)}); pass "
        "one name per category in ascending category-id order, a list indexed by model label with "
        "[0] = background (with label_to_cat_id), a list indexed by category id, or a dict "
        "{category_id: name}"
    )


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------


def encode_masks(masks: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
    """Encodes binary masks as COCO compressed RLE.

    Args:
        masks: ``[N, H, W]`` or ``[N, 1, H, W]``. Floating point: probabilities, foreground where
            ``> 0.5``; bool or integer: foreground where non-zero.

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": str}`` (column-major RLE as pycocotools encodes it,
        ``counts`` decoded to ``str`` so that the list is JSON-serialisable).

    Raises:
        ValueError: ``masks`` has another shape.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu()
        if masks.dtype == torch.bfloat16:
            masks = masks.float()
        masks = masks.numpy()
    masks = np.asarray(masks)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(
            f"masks must have shape [N, H, W] or [N, 1, H, W], got {list(masks.shape)}"
        )
    if masks.shape[0] == 0:
        return []
    binary = masks > MASK_THRESHOLD if np.issubdtype(masks.dtype, np.floating) else masks != 0
    # pycocotools wants an [H, W, N] uint8 array in Fortran (column-major) order.
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    out = []
    for rle in rles:
        counts = rle["counts"]
        out.append({"size": [int(s) for s in rle["size"]],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts})
    return out


def load_results_json(results_json: str | Path | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Reads a COCO results file (a JSON list of detections) and checks its shape.

    Args:
        results_json: A path, or an already loaded list of result dicts (copied).

    Returns:
        The list of result dicts.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not JSON, not a list of objects, or empty.
    """
    if isinstance(results_json, (str, Path)):
        results = _read_json(results_json, "results")
        where = f"results file {results_json}"
    else:
        results = copy.deepcopy(list(results_json))
        where = "results"
    if not isinstance(results, list):
        raise ValueError(
            f"{where} holds a JSON {type(results).__name__}; COCO results are a JSON list of "
            "{'image_id', 'category_id', 'score', 'bbox' and/or 'segmentation'} objects"
        )
    if not results:
        raise ValueError(
            f"{where} is an empty list: there is nothing to evaluate (a model with no detections at "
            "all has AP 0; COCOEvaluator reports that case)"
        )
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ValueError(f"{where}: entry #{i} is a {type(r).__name__}, not an object")
    return results


def _infer_iou_types(results: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    types = tuple(t for t, key in (("bbox", "bbox"), ("segm", "segmentation"))
                  if any(key in r for r in results))
    if not types:
        raise ValueError(
            "cannot infer the iou type: no result has a 'bbox' or a 'segmentation' key "
            f"(first entry keys: {sorted(results[0])})"
        )
    return types


def _validate_results(results: Sequence[dict[str, Any]], coco_gt: COCO, iou_types: Sequence[str],
                      where: str) -> None:
    """Checks the results against the ground truth; converts uncompressed RLE in place."""
    img_ids = set(coco_gt.getImgIds())
    cat_ids = set(coco_gt.getCatIds())
    bad_imgs, bad_cats = [], []
    for i, r in enumerate(results):
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise ValueError(f"{where}: entry #{i} has no '{key}' (keys: {sorted(r)})")
        for key in ("image_id", "category_id"):
            if isinstance(r[key], (bool, np.bool_)) or not isinstance(r[key], numbers.Integral):
                raise ValueError(f"{where}: entry #{i} has {key} {r[key]!r}; ids must be integers")
        if r["image_id"] not in img_ids:
            bad_imgs.append(r["image_id"])
        if r["category_id"] not in cat_ids:
            bad_cats.append(r["category_id"])
        score = r["score"]
        if not isinstance(score, numbers.Real) or not math.isfinite(score):
            raise ValueError(f"{where}: entry #{i} (image {r['image_id']!r}) has score {score!r}; "
                             "scores must be finite numbers")
        if "bbox" in iou_types:
            box = r.get("bbox")
            if (not isinstance(box, (list, tuple)) or len(box) != 4
                    or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in box)):
                raise ValueError(f"{where}: entry #{i} (image {r['image_id']!r}) has bbox {box!r}; bbox "
                                 "evaluation needs [x, y, width, height] with 4 finite numbers")
            if box[2] < 0 or box[3] < 0:
                raise ValueError(f"{where}: entry #{i} (image {r['image_id']!r}) has bbox {box!r} with a negative "
                                 "width or height; COCO boxes are [x, y, width, height] (xyxy boxes must be "
                                 "converted: width = x2 - x1)")
        if "segm" in iou_types:
            seg = r.get("segmentation")
            if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
                raise ValueError(
                    f"{where}: entry #{i} (image {r['image_id']!r}) has no RLE 'segmentation' "
                    "({'size': [h, w], 'counts': ...}); segm results must be RLE (encode_masks makes it)"
                )
            if isinstance(seg["counts"], list):  # uncompressed RLE -> compressed
                rle = mask_util.frPyObjects(seg, *seg["size"])
                r["segmentation"] = {"size": seg["size"], "counts": rle["counts"].decode("ascii")}
    if bad_imgs:
        raise ValueError(
            f"{where}: results on image ids {_few(bad_imgs)} that are not in the annotations' images "
            f"({len(img_ids)} images, e.g. {_few(img_ids)}); results must use the annotations' image ids"
        )
    if bad_cats:
        raise ValueError(
            f"{where}: results with category ids {_few(bad_cats)} that are not in the annotations' "
            f"categories {_few(cat_ids)}; map contiguous labels back to COCO category ids "
            "(label_to_cat_id)"
        )
    if "segm" in iou_types:
        for i, r in enumerate(results):
            img = coco_gt.imgs[r["image_id"]]
            size = [int(s) for s in r["segmentation"]["size"]]
            if size != [img["height"], img["width"]]:
                raise ValueError(
                    f"{where}: entry #{i}: mask size {size} for image {r['image_id']} which is "
                    f"{[img['height'], img['width']]} (height, width); masks must be pasted at the "
                    "original image size"
                )


def _report_uncounted(results: Sequence[Mapping[str, Any]], where: str, max_dets: int = 100) -> int:
    """Warns about the detections COCOeval skips: beyond the ``max_dets`` best of an image and category.

    Returns:
        How many detections are not counted.
    """
    per_pair: dict[tuple[Any, Any], int] = {}
    for r in results:
        key = (r["image_id"], r["category_id"])
        per_pair[key] = per_pair.get(key, 0) + 1
    over = {k: n - max_dets for k, n in per_pair.items() if n > max_dets}
    skipped = sum(over.values())
    if skipped:
        _warn(f"{where}: {skipped} of {len(results)} detections are not counted: COCO evaluation keeps the "
              f"{max_dets} highest-scoring detections per image and category (maxDets={max_dets}), and "
              f"{len(over)} image/category pair(s) have more (e.g. image {next(iter(over))[0]})")
    return skipped


def _results_for(results: Sequence[Mapping[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Copies of the results with only the keys ``iou_type`` needs (segm: no bbox)."""
    key = "bbox" if iou_type == "bbox" else "segmentation"
    return [{"image_id": r["image_id"], "category_id": r["category_id"], key: copy.deepcopy(r[key]),
             "score": r["score"]} for r in results]


# ----------------------------------------------------------------------------------------------------
# Running COCOeval
# ----------------------------------------------------------------------------------------------------


def _empty_results(coco_gt: COCO) -> COCO:
    return _quiet_coco({"images": list(coco_gt.dataset["images"]),
                        "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []})


def _run_cocoeval(coco_gt: COCO, results: list[dict[str, Any]], iou_type: str,
                  img_ids: Sequence[int] | None) -> tuple[COCOeval, list[str]]:
    """Runs COCOeval; returns it and the lines ``summarize()`` printed."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        if img_ids is not None:
            coco_eval.params.imgIds = [int(i) for i in img_ids]
        coco_eval.evaluate()
        coco_eval.accumulate()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_eval.summarize()
    return coco_eval, buf.getvalue().splitlines()


def _per_category_ap(coco_eval: COCOeval) -> dict[int, float]:
    """AP@[.50:.95], area all, maxDets 100, of each category with ground truth (detectron2's rule)."""
    precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
    out = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            out[int(cat_id)] = float(np.mean(p))
    return out


def format_category_table(values: Mapping[str, float], *, header: str = "AP", columns: int = 3) -> str:
    """Formats ``{name: value}`` as a Markdown pipe table with ``columns`` (name, value) pairs.

    Args:
        values: Name -> value (printed with 3 decimals, like pycocotools' table; NaN as ``nan``).
        header: The value column's title.
        columns: How many (name, value) pairs per row.

    Returns:
        The table, rows filled left to right.
    """
    items = [(str(k), "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}")
             for k, v in values.items()]
    if not items:
        return "(no categories)"
    columns = max(1, min(columns, len(items)))
    wn = max(len("category"), *(len(n) for n, _ in items))
    wv = max(len(header), *(len(v) for _, v in items))
    head = "|" + "|".join(f" {'category':<{wn}} | {header:<{wv}} " for _ in range(columns)) + "|"
    rule = "|" + "|".join(f":{'-' * (wn + 1)}|:{'-' * (wv + 1)}" for _ in range(columns)) + "|"
    rows = [head, rule]
    for start in range(0, len(items), columns):
        chunk = items[start:start + columns] + [("", "")] * (columns - len(items[start:start + columns]))
        rows.append("|" + "|".join(f" {n:<{wn}} | {v:<{wv}} " for n, v in chunk) + "|")
    return "\n".join(rows)


def _plot_pr_curve(coco_eval: COCOeval, iou_type: str, path: Path) -> bool:
    """Writes the category-averaged precision-recall curves; returns False if nothing to plot."""
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # [T, R, K], area all, maxDets 100
    valid = precision[0, 0, :] > -1  # a category is all -1 or not at all (no GT)
    if not valid.any():
        return False
    from matplotlib.figure import Figure  # lazy: matplotlib is slow to import; no pyplot state

    iou_thrs = coco_eval.params.iouThrs
    rec = coco_eval.params.recThrs
    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    curves = [
        (f"IoU={iou_thrs[0]:.2f}:{iou_thrs[-1]:.2f}", precision[:, :, valid].mean(axis=(0, 2)), "-"),
        ("IoU=0.50", precision[t50][:, valid].mean(axis=1), "--"),
        ("IoU=0.75", precision[t75][:, valid].mean(axis=1), ":"),
    ]
    fig = Figure(figsize=(6.4, 5.2), dpi=100)
    ax = fig.subplots()
    for label, curve, style in curves:
        ax.plot(rec, curve, style, linewidth=2, label=f"{label}  (AP={curve.mean():.3f})")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_title(f"COCO {iou_type} precision-recall\n(area=all, maxDets=100, mean over "
                 f"{int(valid.sum())} categories)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path, "evaluation plot"):  # a full disk: one line naming the file
        fig.savefig(path)
    return True


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> None so that the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _evaluate_results(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    iou_types: Sequence[str],
    *,
    img_ids: Sequence[int] | None,
    names: Mapping[int, str],
    output_dir: Path | None,
) -> tuple[dict[str, dict[str, float]], dict[str, COCOeval]]:
    """Evaluates validated results; prints the tables and writes metrics.json / PR plots."""
    metrics: dict[str, dict[str, float]] = {}
    evals: dict[str, COCOeval] = {}
    report: dict[str, Any] = {}
    n_images = len(img_ids) if img_ids is not None else len(coco_gt.getImgIds())
    for iou_type in iou_types:
        coco_eval, lines = _run_cocoeval(coco_gt, _results_for(results, iou_type), iou_type, img_ids)
        evals[iou_type] = coco_eval
        stats = [float(s) for s in coco_eval.stats]
        per_cat = _per_category_ap(coco_eval)
        named = dict(zip(METRIC_NAMES, stats))
        per_cat_named = {f"AP-{names.get(c, str(c))}": ap for c, ap in per_cat.items()}
        metrics[iou_type] = {**named, **per_cat_named}

        log_report(_log, "\n".join([
            f"COCO evaluation ({iou_type}), {n_images} images, {len(results)} detections:",
            *lines,
            f"Per-category {iou_type} AP (IoU=0.50:0.95, area=all, maxDets=100), "
            f"{len(per_cat)} categories with ground truth:",
            format_category_table({names.get(c, str(c)): ap for c, ap in per_cat.items()}),
        ]))

        report[iou_type] = {
            "summary": named,
            "stats": stats,
            "per_category_AP": {names.get(c, str(c)): ap for c, ap in per_cat.items()},
            "per_category_AP_by_id": {str(c): ap for c, ap in per_cat.items()},
        }
        if output_dir is not None:
            _plot_pr_curve(coco_eval, iou_type, output_dir / f"pr_curve_{iou_type}.png")
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        report = {"num_images": n_images, "num_detections": len(results), "units": "fraction",
                  **report}
        with writing(output_dir / METRICS_FILENAME, "evaluation file"):
            (output_dir / METRICS_FILENAME).write_text(json.dumps(_json_safe(report), indent=2))
    return metrics, evals


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a single integer, got a tensor of shape {list(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def instances_to_coco_json(
    image_id: int,
    output: Mapping[str, Any],
    label_to_cat_id: Mapping[int, int] | None = None,
    *,
    iou_types: Iterable[str] | None = None,
    image_size: tuple[int, int] | None = None,
    cat_ids: Collection[int] | None = None,
) -> list[dict[str, Any]]:
    """Converts one image's detections (torchvision convention) to COCO result dicts.

    The one converter of this project: :class:`COCOEvaluator` uses it, and so does anything that
    writes a COCO results JSON. Boxes go from ``xyxy`` to ``xywh`` (absolute pixels), labels through
    ``label_to_cat_id``, and masks to compressed RLE (floating-point masks are foreground where
    ``> 0.5``, torchvision's rule; bool/integer masks where non-zero).

    Example::

        >>> out = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "scores": torch.tensor([0.5]),
        ...        "labels": torch.tensor([2])}
        >>> instances_to_coco_json(5, out, {1: 10, 2: 20})
        [{'image_id': 5, 'category_id': 20, 'score': 0.5, 'bbox': [1.0, 2.0, 10.0, 20.0]}]

    Args:
        image_id: The COCO image id of these detections.
        output: ``scores`` ``[N]``, ``labels`` ``[N]`` (integers), ``boxes`` ``[N, 4]`` xyxy in the
            original image's pixels and/or ``masks`` ``[N, 1, H, W]`` probabilities or
            ``[N, H, W]`` bool/uint8 at the original image size. Tensors may live on any device.
        label_to_cat_id: Contiguous model label -> COCO category id; ``None``: the labels already
            are category ids.
        iou_types: What to convert: ``"bbox"`` (adds ``bbox``) and/or ``"segm"`` (adds
            ``segmentation``). ``None``: bbox if ``output`` has ``boxes``, segm if it has ``masks``.
        image_size: ``(height, width)`` of the image; when given, masks must have that size.
        cat_ids: The valid category ids; when given (and no ``label_to_cat_id``), labels outside
            them are refused.

    Returns:
        One dict per detection: ``{"image_id", "category_id", "score", "bbox": [x, y, w, h],
        "segmentation": {"size": [H, W], "counts": str}}`` (the keys the iou types ask for),
        JSON-serialisable.

    Raises:
        ValueError: A key is missing, shapes or lengths disagree, labels are not integers, a label
            has no category, a box or score is NaN/inf, a box has x2 < x1 or y2 < y1 (xywh passed
            as xyxy), or a mask does not have the image's size. The message names the image.
    """
    image_id = _as_int(image_id, "image id")
    where = f"outputs for image {image_id}"
    if not isinstance(output, Mapping):
        raise ValueError(f"{where}: expected a dict with boxes/scores/labels, got {type(output).__name__}")
    if iou_types is None:
        types = tuple(t for t, key in (("bbox", "boxes"), ("segm", "masks")) if key in output)
        if not types:
            raise ValueError(f"{where} have neither 'boxes' nor 'masks' (keys: {sorted(output)}); "
                             "there is nothing to convert to COCO results")
    else:
        types = _check_iou_types(iou_types)

    def get(key: str) -> torch.Tensor:
        if key not in output:
            raise ValueError(f"{where} have no '{key}' (keys: {sorted(output)}); COCO "
                             f"{'/'.join(types)} results need it")
        value = output[key]
        if isinstance(value, torch.Tensor):
            return value.detach().cpu()
        return torch.as_tensor(np.asarray(value))

    scores = get("scores").reshape(-1)
    n = scores.numel()
    labels = get("labels").reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"{where}: {labels.numel()} labels for {n} scores")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{where}: labels must be an integer tensor, got {labels.dtype}")
    scores = scores.double()
    if not torch.isfinite(scores).all():
        raise ValueError(f"{where}: scores contain NaN or inf; the model produced invalid scores")
    if n == 0:
        return []

    if label_to_cat_id is not None:
        unmapped = sorted({int(v) for v in labels.tolist()} - set(label_to_cat_id))
        if unmapped:
            raise ValueError(
                f"{where}: labels {_few(unmapped)} are not keys of label_to_cat_id "
                f"(keys {min(label_to_cat_id, default=None)}..{max(label_to_cat_id, default=None)})"
            )
        categories = [int(label_to_cat_id[int(v)]) for v in labels.tolist()]
    else:
        categories = [int(v) for v in labels.tolist()]
        if cat_ids is not None:
            bad = [c for c in categories if c not in cat_ids]
            if bad:
                raise ValueError(
                    f"{where}: category ids {_few(bad)} are not in the annotations' categories "
                    f"{_few(cat_ids)}; if the model predicts contiguous labels 1..K pass label_to_cat_id"
                )

    results = [{"image_id": image_id, "category_id": c, "score": float(s)}
               for c, s in zip(categories, scores.tolist())]
    if "bbox" in types:
        boxes = get("boxes")
        if boxes.dim() != 2 or boxes.shape != (n, 4):
            raise ValueError(f"{where}: boxes have shape {list(boxes.shape)}, expected [{n}, 4] (xyxy)")
        boxes = boxes.double()
        if not torch.isfinite(boxes).all():
            raise ValueError(f"{where}: boxes contain NaN or inf; the model produced invalid boxes")
        wh = boxes[:, 2:] - boxes[:, :2]
        if (wh < 0).any():
            raise ValueError(
                f"{where}: boxes with x2 < x1 or y2 < y1; boxes must be xyxy (x1, y1, x2, y2) in "
                "pixels of the original image (xywh boxes passed as xyxy look like this)"
            )
        for r, b in zip(results, torch.cat([boxes[:, :2], wh], dim=1).tolist()):
            r["bbox"] = b
    if "segm" in types:
        raw = output.get("masks")
        if raw is None:
            get("masks")  # raises: no masks
        if isinstance(raw, torch.Tensor) and raw.is_floating_point():
            raw = raw.detach() > MASK_THRESHOLD  # binarise on the device: copy 1/4 of the bytes
        masks = raw.cpu() if isinstance(raw, torch.Tensor) else torch.as_tensor(np.asarray(raw))
        shape = list(masks.shape)
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        size_ok = image_size is None or tuple(masks.shape[1:]) == tuple(image_size)
        if masks.dim() != 3 or masks.shape[0] != n or not size_ok:
            h, w = image_size if image_size is not None else ("H", "W")
            raise ValueError(
                f"{where}: masks have shape {shape}, expected [{n}, 1, {h}, {w}] or [{n}, {h}, {w}] "
                "(masks pasted at the original image size)"
            )
        for r, rle in zip(results, encode_masks(masks)):
            r["segmentation"] = rle
    return results


class COCOEvaluator(DatasetEvaluator):
    """Accumulates model outputs and evaluates them with pycocotools (bbox and/or segm).

    A :class:`~detection.evaluation.DatasetEvaluator`; typical use (one evaluator per validation
    set; ``reset()`` before each evaluation, or let :func:`~detection.evaluation.inference_on_dataset`
    drive it)::

        evaluator = COCOEvaluator(val_set.coco, iou_types=("bbox", "segm"),
                                  label_to_cat_id=val_set.label_to_cat_id, output_dir="out/eval")
        evaluator.reset()
        for images, targets in loader:
            evaluator.process(targets, model(images))   # targets[i]["image_id"]
        metrics = evaluator.evaluate()   # {"bbox": {"AP": 0.37, ...}, "segm": {...}}

    Distributed: when ``torch.distributed`` is initialised (world size > 1), **every rank must call
    ``evaluate()``** (it is a collective: ``all_gather_object``). Each rank processes its own share
    of the images; rank 0 gathers all ranks' results, de-duplicates them by image id (a padding
    sampler such as ``DistributedSampler`` repeats images; the first copy is kept), computes, logs
    and writes the outputs and returns the metrics; the other ranks return ``{}``. With NCCL,
    ``all_gather_object`` uses the current CUDA device: call ``torch.cuda.set_device(local_rank)``
    first (as every DDP script does).

    The evaluation covers exactly the images given to ``process()`` (detectron2's rule: an image
    processed with no detections counts, an image never processed does not); a
    :class:`COCOEvalWarning` says when that is a strict subset of the annotations' images.
    If nothing was processed at all, all the annotations' images are evaluated with no detections.

    Metrics are fractions in [0, 1]; see the module docstring for keys, -1 and per-category AP.

    Attributes:
        coco_gt: The private (validated, possibly repaired) ground-truth ``COCO`` object.
        iou_types: The evaluated iou types.
        stats: After ``evaluate()`` on rank 0: ``{iou_type: the 12 raw COCOeval.stats}``.
        coco_eval: After ``evaluate()`` on rank 0: ``{iou_type: the COCOeval object}``.
    """

    def __init__(
        self,
        coco_gt: COCO | str | Path,
        *,
        iou_types: Iterable[str] = ("bbox",),
        label_to_cat_id: Mapping[int, int] | None = None,
        output_dir: str | Path | None = None,
        class_names: Mapping[int, str] | Sequence[str] | None = None,
    ) -> None:
        """Creates the evaluator.

        Args:
            coco_gt: Ground truth: a pycocotools ``COCO`` (copied, never modified) or the path to an
                instances JSON file.
            iou_types: ``"bbox"`` and/or ``"segm"``.
            label_to_cat_id: Contiguous model label -> COCO category id. ``None``: the model's labels
                already are COCO category ids.
            output_dir: Where to write ``coco_instances_results.json``, ``metrics.json`` and
                ``pr_curve_<iou_type>.png`` (rank 0 only); ``None`` writes nothing.
            class_names: Category names for the per-category metrics (default: the annotations'
                names): a dict ``{category_id: name}``; or a list of one name per category in
                ascending category-id order; or a list indexed by model label with ``[0]`` =
                background (``dataset.class_names``; needs ``label_to_cat_id``); or, without
                ``label_to_cat_id``, a list indexed by category id (torchvision's 91 COCO names).

        Raises:
            ValueError: Unknown iou type, unusable ground truth, or a ``label_to_cat_id`` /
                ``class_names`` that does not fit the annotations' categories.
        """
        self.iou_types = _check_iou_types(iou_types)
        self.coco_gt = load_coco_gt(coco_gt, iou_types=self.iou_types)
        self._img_sizes = {
            int(i): (img.get("height"), img.get("width")) for i, img in self.coco_gt.imgs.items()
        }
        self._cat_ids = set(self.coco_gt.getCatIds())
        if label_to_cat_id is not None:
            mapping = {_as_int(k, "label_to_cat_id key"): _as_int(v, "label_to_cat_id value")
                       for k, v in dict(label_to_cat_id).items()}
            bad = [v for v in mapping.values() if v not in self._cat_ids]
            if bad:
                raise ValueError(
                    f"label_to_cat_id maps to category ids {_few(bad)} that are not in the annotations' "
                    f"categories {_few(self._cat_ids)}"
                )
            self.label_to_cat_id: dict[int, int] | None = mapping
        else:
            self.label_to_cat_id = None
        self.category_names = _category_names(self.coco_gt, class_names, self.label_to_cat_id)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.stats: dict[str, list[float]] = {}
        self.coco_eval: dict[str, COCOeval] = {}
        self.reset()

    def reset(self) -> None:
        """Forgets everything processed so far (call before each evaluation)."""
        self._predictions: dict[int, list[dict[str, Any]]] = {}

    def process(
        self,
        inputs: Sequence[Mapping[str, Any]] | Sequence[int] | torch.Tensor,
        outputs: Sequence[Mapping[str, Any]],
    ) -> None:
        """Converts one batch of model outputs to COCO results and stores them.

        Args:
            inputs: The batch's targets (dicts with the COCO ``image_id``), or directly the image
                ids (a list or a tensor), one per output.
            outputs: torchvision-style dicts, one per image: ``boxes`` ``[N, 4]`` xyxy in original
                image pixels, ``scores`` ``[N]``, ``labels`` ``[N]`` (contiguous labels if
                ``label_to_cat_id`` was given, else COCO category ids) and, for segm, ``masks``
                ``[N, 1, H, W]`` probabilities or ``[N, H, W]`` bool/uint8 at the original image size.
                Tensors may live on any device.

        Raises:
            ValueError: Lengths differ, a target has no ``image_id``, an image id or category is not
                in the annotations, a key is missing, shapes disagree, a box or score is NaN/inf, a
                box has x2 < x1 or y2 < y1, or a mask does not have the image's size. The message
                names the image.
        """
        if isinstance(inputs, torch.Tensor):
            image_ids: list[Any] = inputs.reshape(-1).tolist()
        else:
            image_ids = []
            for i, item in enumerate(inputs):
                if isinstance(item, Mapping):
                    if "image_id" not in item:
                        raise ValueError(f"process(): inputs[{i}] has no 'image_id' (keys: {sorted(item)}); "
                                         "pass the dataset's targets or the COCO image ids")
                    item = item["image_id"]
                image_ids.append(item)
        if len(image_ids) != len(outputs):
            raise ValueError(f"process() got {len(image_ids)} image ids but {len(outputs)} outputs; "
                             "pass one image id per output dict")
        ids = [_as_int(i, "image id") for i in image_ids]
        unknown = [i for i in ids if i not in self._img_sizes]
        if unknown:
            raise ValueError(
                f"process() got image ids {_few(unknown)} that are not in the annotations' images "
                f"({len(self._img_sizes)} images, e.g. {_few(self._img_sizes)}); pass the dataset's "
                "COCO image ids (target['image_id']), not batch indices"
            )
        converted = [
            instances_to_coco_json(img_id, out, self.label_to_cat_id, iou_types=self.iou_types,
                                   image_size=self._img_sizes[img_id], cat_ids=self._cat_ids)
            for img_id, out in zip(ids, outputs)
        ]
        for img_id, results in zip(ids, converted):
            self._predictions.setdefault(img_id, results)  # an image seen twice keeps its first results

    def _gather(self) -> dict[int, list[dict[str, Any]]] | None:
        """All ranks' predictions on rank 0 (None on the other ranks), de-duplicated by image id."""
        if get_world_size() == 1:
            return dict(self._predictions)
        parts = all_gather_object(self._predictions)
        if not is_main_process():
            return None
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in parts:
            for img_id, results in part.items():
                merged.setdefault(img_id, results)
        return merged

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Evaluates everything processed since the last ``reset()``.

        Returns:
            ``{iou_type: {"AP": ..., "AP50": ..., ..., "ARl": ..., "AP-<category>": ...}}`` as
            fractions (``-1.0`` where pycocotools gives -1), on rank 0 / without distributed;
            ``{}`` on the other ranks of an initialised process group.
        """
        predictions = self._gather()
        if predictions is None:
            return {}
        all_ids = sorted(self._img_sizes)
        if not predictions:
            _warn(f"COCOEvaluator: no image was processed; evaluating all {len(all_ids)} images of the "
                  "annotations with no detections (AP = 0)")
            img_ids = all_ids
        else:
            img_ids = sorted(predictions)
            if len(img_ids) < len(all_ids):
                _warn(f"COCOEvaluator: evaluating {len(img_ids)} of the {len(all_ids)} images of the "
                      "annotations (only the images given to process()); these metrics are not "
                      "comparable with full-set numbers")
        results = [r for i in img_ids for r in predictions.get(i, ())]
        if predictions and not results:
            _warn(f"COCOEvaluator: no detections on any of the {len(img_ids)} evaluated images; "
                  "AP and AR are 0 (-1 where a setting has no ground truth)")
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with writing(self.output_dir / RESULTS_FILENAME, "evaluation file"):
                (self.output_dir / RESULTS_FILENAME).write_text(json.dumps(results))
        metrics, evals = _evaluate_results(self.coco_gt, results, self.iou_types, img_ids=img_ids,
                                           names=self.category_names, output_dir=self.output_dir)
        self.coco_eval = evals
        self.stats = {t: [float(s) for s in e.stats] for t, e in evals.items()}
        return metrics


def evaluate_results_json(
    results_json: str | Path | Sequence[Mapping[str, Any]],
    annotations_json: str | Path | COCO,
    *,
    iou_types: Iterable[str] | None = None,
    output_dir: str | Path | None = None,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluates a COCO results file against an instances file, as pycocotools would.

    All images of the annotations are evaluated (pycocotools' default ``imgIds``): an image without
    any result counts as having no detections. Entries with both ``bbox`` and ``segmentation``
    (detectron2's and this module's results files) are evaluated as boxes for bbox and as masks
    only (the ``bbox`` key dropped) for segm.

    Args:
        results_json: A results JSON file (or the loaded list): ``[{"image_id", "category_id",
            "score", "bbox": [x, y, w, h]} | {..., "segmentation": RLE}, ...]``.
        annotations_json: The ground-truth instances JSON file (or a ``COCO`` object).
        iou_types: ``"bbox"`` and/or ``"segm"``; ``None`` infers them: bbox if results have
            ``bbox``, segm if they have ``segmentation``.
        output_dir: If set, ``metrics.json`` and ``pr_curve_<iou_type>.png`` are written there.
        class_names: As for :class:`COCOEvaluator`.

    Returns:
        ``{iou_type: metrics}`` as :meth:`COCOEvaluator.evaluate` returns them.

    Raises:
        FileNotFoundError: A file does not exist.
        ValueError: A file is not JSON, the results are empty or malformed, or they refer to images
            or categories that are not in the annotations.
    """
    results = load_results_json(results_json)
    types = _infer_iou_types(results) if iou_types is None else _check_iou_types(iou_types)
    coco_gt = load_coco_gt(annotations_json, iou_types=types)
    where = f"results file {results_json}" if isinstance(results_json, (str, Path)) else "results"
    _validate_results(results, coco_gt, types, where)
    _report_uncounted(results, where)
    metrics, _ = _evaluate_results(
        coco_gt, results, types, img_ids=None, names=_category_names(coco_gt, class_names),
        output_dir=Path(output_dir) if output_dir is not None else None,
    )
    return metrics

"""COCO bbox / segm evaluation without torch: ground truth, results files, the two backends, tables, plots.

Everything here works on plain Python / numpy data, so that ``resnet-det eval --results R --annotations A``
never imports torch or the models (that would cost seconds and ~0.7 GiB before any work starts);
:mod:`resnet_det.evaluation.coco` adds what needs torch (model outputs -> results, the distributed
:class:`~resnet_det.evaluation.COCOEvaluator`) and re-exports the public names of this module.

Backends (the same numbers, see below):

* ``"faster-coco-eval"`` (default): ``faster_coco_eval.COCOeval_faster``, a maintained C++ port of
  pycocotools' ``COCOeval`` with the same API (about 7x faster on val2017-sized results). If the package
  cannot be imported, the evaluation falls back to pycocotools with one :class:`COCOEvalWarning` per process.
* ``"pycocotools"``: ``pycocotools.cocoeval.COCOeval`` itself, the reference.

How equal they are (tests/evaluation/test_backend_parity.py): the same matching, the same recall and
the same 12 summary lines; ``eval["precision"]`` differs by at most a few ulps (measured max 2.2e-16):
pycocotools divides ``tp / (tp + fp + np.spacing(1))``, the C++ code ``tp / (tp + fp)``, so a precision
of 1 is ``1 - 2.2e-16`` in pycocotools and exactly ``1.0`` in faster-coco-eval; the stats and per-category
AP, means of those values, differ by the same order (tests: <= 1e-12). faster-coco-eval's other
differences from pycocotools, and how this module deals with them:

* ``COCOeval_faster`` reports through ``print_function`` (default ``logging.info``), not stdout: the lines
  are collected and logged with the tables, as pycocotools' captured stdout is.
* ``separate_eval`` (default False, kept) folds ``accumulate`` into ``evaluate``: after the IoUs (a Python
  loop) one C++ call matches and accumulates, and it is timed as the "accumulate" stage here. True keeps
  every per-image result alive between the two calls (measured at val2017 scale: +0.5 GiB, and slower).
  ``evalImgs`` is never filled (the per-image results stay in C++).
* ``lvis_style`` (default False), ``extra_calc`` (default False, adds mIoU / mAUC to ``all_stats``) and the
  keypoint settings are left at their defaults; only bbox and segm are evaluated here.
* ``summarize()`` prints and stores two more values (AR at IoU 0.50 and 0.75, ``all_stats[12:14]``): the
  table shows pycocotools' 12 lines. It adapts its layout to ``params.maxDets``: with other maxDets than
  ``[1, 10, 100]`` it reports one AR per maxDets and ``stats`` is not pycocotools' 12 values. Parameters
  are never changed here (pycocotools' defaults: 10 IoU thresholds, 101 recall points, maxDets 1/10/100, three areas).
* ``maxDets``: both sort the detections of an image and category by score (stable: ties keep the order
  of the results) and keep the first ``maxDets[-1]``; both concatenate images in id order before the
  stable sort of ``accumulate``, so ties in score are broken the same way.
* It writes ``ignore`` and, for segm, ``rle`` into the annotation dicts, where pycocotools rewrites
  ``segmentation`` to RLE: the ground truth is always a private copy.
* Segm IoUs are computed on up to ``rle_iou_max_workers`` threads (bounded by the CPUs).

Metrics are **fractions** in [0, 1]. The 12 summary metrics use detectron2's names, in pycocotools'
order (:data:`METRIC_NAMES` = ``stats[0..11]``); ``-1.0`` means "no ground truth in that setting".
Per-category AP (IoU 0.50:0.95, area all, maxDets 100) is ``AP-<category name>`` for every category
with at least one non-crowd ground truth among the evaluated images.

Pitfalls handled, with both backends (all seen on the pycocotools / detectron2 / torchvision trackers):

* ``COCO.loadRes([])`` raises ``IndexError``: with no detections the evaluation runs on an empty result
  set (AP = AR = 0 where ground truth exists, -1 where a setting has none) and a warning is emitted.
* results on image ids that are not in the annotations (pycocotools asserts "Results do not correspond
  to current coco set") and category ids that are not there (silently dropped) raise ``ValueError``
  listing a few of the offending ids.
* ground-truth annotation id 0 is never counted as a match (matches are stored as ids, 0 = unmatched)
  and duplicate ids make ``loadAnns`` return the wrong objects: the annotations are renumbered 1..N (on
  a private copy) with a warning.
* annotations without ``iscrowd`` are taken as ``iscrowd = 0`` with a warning; without ``area`` they
  raise ``ValueError`` (the area decides the small/medium/large split).
* NaN / inf boxes or scores, negative widths / heights, masks of the wrong size raise ``ValueError``
  naming the entry and the image.
* segm results are evaluated without their ``bbox`` key, so the area comes from the mask (with a
  ``bbox`` key ``loadRes`` would take the box area).

Validation of a results file is vectorised: the JSON is read once with the standard library (the
cyclic garbage collector paused meanwhile: it would otherwise rescan the half million new dicts many
times), the fields are gathered into numpy columns once and checked there; per-entry Python loops run
only to name an offending entry.

Progress and logs: each stage (load, validate, evaluate, accumulate, report) is timed and the times
are logged (and stored in ``metrics.json`` under ``timings_s``); during ``evaluate`` a tqdm bar counts
image-category pairs when stderr is a terminal, and a log line every 10 s reports how far it is.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import logging
import math
import numbers
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resnet_det_common.io import atomic_write, writing
from resnet_det_common.logs import log_report, progress_bar

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "IOU_TYPES",
    "METRICS_FILENAME",
    "METRIC_NAMES",
    "RESULTS_FILENAME",
    "COCOEvalWarning",
    "default_backend",
    "evaluate_results_json",
    "format_category_table",
    "load_coco_gt",
    "load_results_json",
    "resolve_backend",
    "set_default_backend",
]

IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
"""The iou types this module evaluates."""

METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
"""Names of ``COCOeval.stats[0..11]``, in that order (detectron2's keys)."""

BACKENDS: tuple[str, ...] = ("faster-coco-eval", "pycocotools")
"""The evaluators: faster-coco-eval's C++ ``COCOeval_faster`` and pycocotools' ``COCOeval`` (the reference)."""
DEFAULT_BACKEND = "faster-coco-eval"

RESULTS_FILENAME = "coco_instances_results.json"
METRICS_FILENAME = "metrics.json"
MASK_THRESHOLD = 0.5
"""Floating-point masks are foreground where ``mask > MASK_THRESHOLD`` (torchvision's rule)."""

LOG_EVERY_S = 10.0
"""Seconds between two progress log lines of a running evaluation (the first comes after this long)."""

_MAX_LISTED = 5  # how many offending ids an error message lists
_log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".coco")  # one logger name for the whole COCO evaluation
_state: dict[str, Any] = {"default": None, "fallback_warned": False}


class COCOEvalWarning(UserWarning):
    """Warnings of the COCO evaluation (empty predictions, repaired annotations, subsets, backend fallback)."""


def _warn(message: str) -> None:
    warnings.warn(message, COCOEvalWarning, stacklevel=3)


def _few(ids: Iterable[Any]) -> str:
    """Formats up to ``_MAX_LISTED`` ids (sorted) and how many more there are."""
    ids = sorted(set(ids), key=lambda x: (str(type(x)), x))
    shown = ", ".join(repr(i) for i in ids[:_MAX_LISTED])
    more = len(ids) - _MAX_LISTED
    return f"[{shown}{f', ... ({more} more)' if more > 0 else ''}]"


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector (reference counting still frees everything acyclic).

    Why: reading half a million result dicts triggers dozens of collections that each walk every young
    container, and the data made here has no cycles: the pause changes no memory, only time. On leaving
    (the outermost pause only), the objects made meanwhile are moved to the oldest generation without a
    scan (``gc.freeze()`` then ``gc.unfreeze()``): otherwise the first collection after the pause would
    walk them all at once.
    """
    if not gc.isenabled():  # already paused (a nested pause) or turned off by the application
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        gc.enable()


# ----------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------


def _import_faster_coco_eval() -> Any:
    import faster_coco_eval
    import faster_coco_eval.core.coco
    import faster_coco_eval.core.faster_eval_api
    import faster_coco_eval.core.mask

    return faster_coco_eval


def default_backend() -> str:
    """The backend used when none is given: :func:`set_default_backend`'s, else :data:`DEFAULT_BACKEND`."""
    return _state["default"] or DEFAULT_BACKEND


def set_default_backend(backend: str | None) -> None:
    """Sets the process-wide default backend (``None``: back to :data:`DEFAULT_BACKEND`).

    What ``resnet-det eval CONFIG --checkpoint W --backend pycocotools`` uses: the evaluators built by
    the task then evaluate with that backend.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {BACKENDS}")
    _state["default"] = backend


def resolve_backend(backend: str | None = None) -> str:
    """The backend that will run: ``backend`` (default :func:`default_backend`), or pycocotools if
    faster-coco-eval cannot be imported (one :class:`COCOEvalWarning` per process says so).

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
    """
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {BACKENDS}")
    if backend == "faster-coco-eval":
        try:
            _import_faster_coco_eval()
        except ImportError as e:
            if not _state["fallback_warned"]:
                _state["fallback_warned"] = True
                _warn(f"faster-coco-eval cannot be imported ({e}); COCO evaluation falls back to pycocotools "
                      "(the same numbers, about 7x slower on large sets). Install it: pip install "
                      "'faster-coco-eval>=1.6'")
            return "pycocotools"
    return backend


def _coco_class(backend: str) -> type:
    if backend == "faster-coco-eval":
        from faster_coco_eval.core.coco import COCO
    else:
        from pycocotools.coco import COCO
    return COCO


def _is_coco(obj: Any) -> bool:
    """A pycocotools or faster-coco-eval ``COCO`` (the same API)."""
    try:
        from pycocotools.coco import COCO as Pyc

        if isinstance(obj, Pyc):
            return True
    except ImportError:
        pass
    with contextlib.suppress(ImportError):
        from faster_coco_eval.core.coco import COCO as Fce

        if isinstance(obj, Fce):
            return True
    return False


def _mask_api() -> Any:
    """The RLE functions (``area``, ``toBbox``, ``frPyObjects``): faster-coco-eval's, else pycocotools'."""
    try:
        from faster_coco_eval.core import mask
    except ImportError:
        from pycocotools import mask
    return mask


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


def _quiet_coco(dataset: dict[str, Any], backend: str) -> Any:
    """Builds a ``COCO`` of ``backend`` from a dataset dict without its prints."""
    coco = _coco_class(backend)()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster-coco-eval":
            coco.print_function = lambda *a, **k: None
        coco.createIndex()
    return coco


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with path.open("rb") as f, _gc_paused():
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


def load_coco_gt(coco_gt: Any, *, iou_types: str | Iterable[str] = ("bbox",), backend: str | None = None) -> Any:
    """Loads (or copies) ground truth and validates it for COCO evaluation.

    Args:
        coco_gt: A ``COCO`` object of pycocotools or faster-coco-eval (deep-copied: the evaluators write
            into the annotations, the caller's object is left alone) or the path to an instances JSON file.
        iou_types: The iou types that will be evaluated; ``"segm"`` additionally requires
            ``segmentation`` on annotations and ``height``/``width`` on images.
        backend: Whose ``COCO`` class to build (see :func:`resolve_backend`; default: the default backend).

    Returns:
        A private ``COCO`` object of the backend, repaired as described in the module docstring.

    Raises:
        FileNotFoundError: ``coco_gt`` is a path that does not exist.
        ValueError: The file is not JSON or not a usable COCO instances file; an unknown backend.
        TypeError: ``coco_gt`` is neither a ``COCO`` nor a path.
    """
    iou_types = _check_iou_types(iou_types)
    backend = resolve_backend(backend)
    if isinstance(coco_gt, (str, Path)):
        dataset = _read_json(coco_gt, "annotations")
        source = f"annotations file {coco_gt}"
    elif _is_coco(coco_gt):
        dataset = copy.deepcopy(coco_gt.dataset)
        source = "ground truth (COCO object)"
    else:
        raise TypeError(f"coco_gt must be a pycocotools COCO or a path, got {type(coco_gt).__name__}")
    return _quiet_coco(_prepare_gt_dataset(dataset, source, iou_types), backend)


def _category_names(
    coco_gt: Any,
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
# Results: reading and (vectorised) validation
# ----------------------------------------------------------------------------------------------------


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
        with _gc_paused():
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
    if set(map(type, results)) != {dict}:
        i = next(i for i, r in enumerate(results) if not isinstance(r, dict))
        raise ValueError(f"{where}: entry #{i} is a {type(results[i]).__name__}, not an object")
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


def _column(results: Sequence[Mapping[str, Any]], key: str, where: str) -> list[Any]:
    try:
        return [r[key] for r in results]
    except KeyError:
        i = next(i for i, r in enumerate(results) if key not in r)
        raise ValueError(f"{where}: entry #{i} has no '{key}' (keys: {sorted(results[i])})") from None


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _is_int_type(t: type) -> bool:
    return issubclass(t, numbers.Integral) and not issubclass(t, (bool, np.bool_))


def _int_column(values: list[Any], key: str, where: str) -> np.ndarray:
    if not all(_is_int_type(t) for t in set(map(type, values))):
        i = next(i for i, v in enumerate(values) if not _is_int_type(type(v)))
        raise ValueError(f"{where}: entry #{i} has {key} {values[i]!r}; ids must be integers")
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        i = next(i for i, v in enumerate(values) if not -(2**63) <= v < 2**63)
        raise ValueError(f"{where}: entry #{i} has {key} {values[i]!r}, out of the 64-bit range of ids") from None


def _real_types_ok(values: Iterable[Any]) -> bool:
    return all(issubclass(t, numbers.Real) for t in set(map(type, values)))


class _Columns:
    """The validated fields of a results list as numpy columns (one row per entry)."""

    def __init__(self, image_id: np.ndarray, category_id: np.ndarray, score: np.ndarray) -> None:
        self.image_id = image_id
        self.category_id = category_id
        self.score = score
        self.box_area: np.ndarray | None = None  # width * height of the bbox column, when checked

    def __len__(self) -> int:
        return len(self.image_id)


def _validate_results(results: list[dict[str, Any]], coco_gt: Any, iou_types: Sequence[str],
                      where: str) -> _Columns:
    """Checks the results against the ground truth, vectorised; converts uncompressed RLE in place.

    Returns:
        The image / category / score columns (used for the counts of the report and the evaluation).

    Raises:
        ValueError: The first problem found, naming the entry (its index in the list) and its image.
    """
    n = len(results)
    image_id = _int_column(_column(results, "image_id", where), "image_id", where)
    category_id = _int_column(_column(results, "category_id", where), "category_id", where)
    scores = _column(results, "score", where)
    score_ok = _real_types_ok(scores)
    score = np.array(scores, dtype=np.float64) if score_ok else None
    if score is None or not np.isfinite(score).all():
        i = (next(i for i, s in enumerate(scores) if not isinstance(s, numbers.Real)) if score is None
             else _first(~np.isfinite(score)))
        raise ValueError(f"{where}: entry #{i} (image {results[i]['image_id']!r}) has score {scores[i]!r}; "
                         "scores must be finite numbers")
    del scores

    img_ids = np.array(sorted(coco_gt.getImgIds()), dtype=np.int64)
    cat_ids = np.array(sorted(coco_gt.getCatIds()), dtype=np.int64)
    boxes = _check_boxes(results, where) if "bbox" in iou_types else None
    if "segm" in iou_types:
        _check_segmentations(results, where)

    bad_img = ~_member(image_id, img_ids)
    if bad_img.any():
        raise ValueError(
            f"{where}: results on image ids {_few(image_id[bad_img].tolist())} that are not in the annotations' "
            f"images ({len(img_ids)} images, e.g. {_few(img_ids[:_MAX_LISTED].tolist())}); results must use the "
            "annotations' image ids"
        )
    bad_cat = ~_member(category_id, cat_ids)
    if bad_cat.any():
        raise ValueError(
            f"{where}: results with category ids {_few(category_id[bad_cat].tolist())} that are not in the "
            f"annotations' categories {_few(cat_ids.tolist())}; map contiguous labels back to COCO category ids "
            "(label_to_cat_id)"
        )
    if "segm" in iou_types:
        _check_mask_sizes(results, where, image_id, coco_gt)
    assert len(image_id) == n
    cols = _Columns(image_id, category_id, score)
    cols.box_area = boxes[:, 2] * boxes[:, 3] if boxes is not None else None
    return cols


def _member(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_ids)`` by binary search in the (small, sorted) ids: no sort of ``values``."""
    pos = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return sorted_ids[pos] == values


def _box_error(results: list[dict[str, Any]], i: int, where: str) -> ValueError:
    return ValueError(f"{where}: entry #{i} (image {results[i].get('image_id')!r}) has bbox "
                      f"{results[i].get('bbox')!r}; bbox evaluation needs [x, y, width, height] with 4 finite numbers")


def _check_boxes(results: list[dict[str, Any]], where: str) -> np.ndarray:
    boxes = [r.get("bbox") for r in results]
    if not set(map(type, boxes)) <= {list, tuple} or set(map(len, boxes)) != {4}:
        i = next(i for i, b in enumerate(boxes) if not isinstance(b, (list, tuple)) or len(b) != 4)
        raise _box_error(results, i, where)
    flat = [v for b in boxes for v in b]
    if not _real_types_ok(flat):
        i = next(i for i, b in enumerate(boxes) if not all(isinstance(v, numbers.Real) for v in b))
        raise _box_error(results, i, where)
    arr = np.array(flat, dtype=np.float64).reshape(-1, 4)
    del flat
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise _box_error(results, _first(~finite), where)
    negative = (arr[:, 2] < 0) | (arr[:, 3] < 0)
    if negative.any():
        i = _first(negative)
        raise ValueError(f"{where}: entry #{i} (image {results[i]['image_id']!r}) has bbox {boxes[i]!r} with a "
                         "negative width or height; COCO boxes are [x, y, width, height] (xyxy boxes must be "
                         "converted: width = x2 - x1)")
    return arr


def _check_segmentations(results: list[dict[str, Any]], where: str) -> None:
    segs = [r.get("segmentation") for r in results]
    ok = set(map(type, segs)) == {dict} and all("counts" in s and "size" in s for s in segs)
    if not ok:
        i = next(i for i, s in enumerate(segs) if not isinstance(s, dict) or "counts" not in s or "size" not in s)
        raise ValueError(
            f"{where}: entry #{i} (image {results[i].get('image_id')!r}) has no RLE 'segmentation' "
            "({'size': [h, w], 'counts': ...}); segm results must be RLE (encode_masks makes it)"
        )
    kinds = set(type(s["counts"]) for s in segs)
    if list in kinds:  # uncompressed RLE -> compressed, as loadRes expects
        mask = _mask_api()
        for r, s in zip(results, segs):
            if isinstance(s["counts"], list):
                h, w = (int(v) for v in s["size"])
                rle = mask.frPyObjects(s, h, w)
                counts = rle["counts"]
                r["segmentation"] = {"size": [h, w],
                                     "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _check_mask_sizes(results: list[dict[str, Any]], where: str, image_id: np.ndarray, coco_gt: Any) -> None:
    sizes = [r["segmentation"]["size"] for r in results]
    try:
        hw = np.array(sizes, dtype=np.int64).reshape(len(sizes), 2)
    except (ValueError, TypeError):
        hw = None
    ids = np.array(sorted(coco_gt.imgs), dtype=np.int64)
    gt_hw = np.array([[coco_gt.imgs[int(i)]["height"], coco_gt.imgs[int(i)]["width"]] for i in ids], dtype=np.int64)
    expected = gt_hw[np.searchsorted(ids, image_id)]
    bad = np.ones(len(sizes), bool) if hw is None else (hw != expected).any(axis=1)
    if bad.any():
        i = _first(bad)
        raise ValueError(
            f"{where}: entry #{i}: mask size {sizes[i]} for image {results[i]['image_id']} which is "
            f"{expected[i].tolist()} (height, width); masks must be pasted at the original image size"
        )


def _rank(values: np.ndarray) -> np.ndarray:
    """The rank of each value among the distinct values (0..K-1)."""
    return np.unique(values, return_inverse=True)[1].reshape(-1)


def _report_uncounted(cols: _Columns, where: str, max_dets: int = 100) -> int:
    """Warns about the detections COCOeval skips: beyond the ``max_dets`` best of an image and category.

    Returns:
        How many detections are not counted.
    """
    if not len(cols):
        return 0
    # one int64 key per (image, category) pair: the category's rank among the results' categories
    cats, cat_rank = np.unique(cols.category_id, return_inverse=True)
    _, first, counts = np.unique(cat_rank.reshape(-1) + len(cats) * _rank(cols.image_id),
                                    return_index=True, return_counts=True)
    over = counts > max_dets
    skipped = int((counts[over] - max_dets).sum())
    if skipped:
        example = int(cols.image_id[first[over][0]])
        _warn(f"{where}: {skipped} of {len(cols)} detections are not counted: COCO evaluation keeps the "
              f"{max_dets} highest-scoring detections per image and category (maxDets={max_dets}), and "
              f"{int(over.sum())} image/category pair(s) have more (e.g. image {example})")
    return skipped


# ----------------------------------------------------------------------------------------------------
# Running the evaluation
# ----------------------------------------------------------------------------------------------------


def _detections_for(results: list[dict[str, Any]], iou_type: str, *, in_place: bool,
                    box_area: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The entries as ``loadRes`` makes them (``id`` 1..N in list order, ``area``, ``iscrowd`` 0), with only
    the key ``iou_type`` needs (segm: no ``bbox``, so that the area is the mask's).

    ``in_place`` reuses the dicts (dropping the other key); otherwise new dicts are made (shallow: the box
    lists and RLE dicts are shared, the evaluators only read them). ``box_area``: the boxes' ``w * h``,
    already computed (the same IEEE products as ``loadRes``'s ``bb[2] * bb[3]``).
    """
    key = "bbox" if iou_type == "bbox" else "segmentation"
    other = "segmentation" if iou_type == "bbox" else "bbox"
    if in_place:
        dets = results
        for r in dets:
            r.pop(other, None)
    else:
        dets = [{"image_id": r["image_id"], "category_id": r["category_id"], key: r[key], "score": r["score"]}
                for r in results]
    if iou_type == "bbox":
        area = box_area.tolist() if box_area is not None else [b[2] * b[3] for b in (d["bbox"] for d in dets)]
    else:
        # the mask's area, as loadRes computes it (one call for all masks); loadRes also adds the mask's
        # box, which no segm evaluation reads: not made here (pycocotools' loadRes, the reference backend,
        # adds it itself)
        segs = [d["segmentation"] for d in dets]
        area = _mask_api().area(segs).tolist() if segs else []
    for i, (d, a) in enumerate(zip(dets, area), start=1):
        d["id"] = i
        d["area"] = a
        d["iscrowd"] = 0
    return dets


def _fce_detections(coco_gt: Any, dets: list[dict[str, Any]], image_id: np.ndarray) -> Any:
    """A faster-coco-eval ``COCO`` of prepared detections, with a vectorised ``getAnnIds``.

    Why not ``loadRes`` + ``createIndex``: they loop over every detection in Python (and ``loadRes`` adds a
    box polygon to each bbox result that no bbox evaluation reads); ``COCOeval_faster`` asks the results
    only for ``getAnnIds(imgIds, catIds)``, ``loadAnns(ids)`` and ``imgs``, answered here from the columns.
    """
    from faster_coco_eval.core.coco import COCO

    class _Results(COCO):  # type: ignore[misc, valid-type]
        def getAnnIds(self, imgIds: Any = None, catIds: Any = None, areaRng: Any = None,
                      iscrowd: Any = None) -> list[int]:
            if areaRng or iscrowd is not None:
                return super().getAnnIds(imgIds=imgIds, catIds=catIds, areaRng=areaRng, iscrowd=iscrowd)
            keep = np.ones(len(dets), bool)
            if imgIds is not None and len(np.atleast_1d(imgIds)):
                keep &= np.isin(image_id, np.asarray(imgIds, dtype=np.int64))
            if catIds is not None and len(np.atleast_1d(catIds)):
                keep &= np.isin(self._cat_col, np.asarray(catIds, dtype=np.int64))
            return (np.flatnonzero(keep) + 1).tolist()

        def loadAnns(self, ids: Any = None) -> list[dict[str, Any]]:
            if ids is None:
                return list(dets)
            if isinstance(ids, int):
                return [dets[ids - 1]]
            if len(ids) == len(dets):
                return list(dets)  # ids are 1..N in order: the whole list
            return [dets[i - 1] for i in ids]

    res = _Results(print_function=lambda *a, **k: None)
    res._cat_col = np.fromiter((d["category_id"] for d in dets), dtype=np.int64, count=len(dets))
    res.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                   "annotations": dets}
    res.imgs = coco_gt.imgs
    res.cats = coco_gt.cats
    res.anns = _LazyAnns(dets)
    return res


class _LazyAnns(Mapping):  # type: ignore[type-arg]
    """``id -> detection`` over the list (ids are 1..N in order), without building a dict of N entries."""

    def __init__(self, dets: list[dict[str, Any]]) -> None:
        self._dets = dets

    def __getitem__(self, key: int) -> dict[str, Any]:
        if not isinstance(key, (int, np.integer)) or not 1 <= key <= len(self._dets):
            raise KeyError(key)
        return self._dets[int(key) - 1]

    def __iter__(self) -> Iterator[int]:
        return iter(range(1, len(self._dets) + 1))

    def __len__(self) -> int:
        return len(self._dets)


def _note(message: str) -> None:
    """A progress or timing line: logged at INFO, or written to stderr when INFO logging is off (a bare
    script, the results mode of ``resnet-det eval``), so that it is seen without changing stdout's tables."""
    if _log.isEnabledFor(logging.INFO):
        _log.info("%s", message)
    else:
        print(message, file=sys.stderr, flush=True)


class _Progress:
    """Counts image-category pairs of a running evaluation: a tqdm bar on a terminal, a log line every
    :data:`LOG_EVERY_S` seconds (so an evaluation that takes a few seconds logs nothing extra)."""

    def __init__(self, what: str, bar: Any) -> None:
        self.what = what
        self.bar = bar
        self.done = 0
        self.total: int | None = None
        self.start = time.perf_counter()
        self.next_log = self.start + LOG_EVERY_S
        self.last: float | None = None  # when the last pair was done

    def wrap(self, fn: Callable[..., Any], total: Callable[[], int | None]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self.done += 1
            if self.total is None:
                self.total = total()
                if self.bar is not None and self.total:
                    self.bar.reset(total=self.total)
            if self.bar is not None and self.done % 64 == 0:
                self.bar.update(64)
            now = self.last = time.perf_counter()
            if now >= self.next_log:
                self.next_log = now + LOG_EVERY_S
                of = f"/{self.total:,} ({100 * self.done / self.total:.0f}%)" if self.total else ""
                _note(f"{self.what}: {self.done:,}{of} image-category pairs, {now - self.start:.0f} s")
            return out

        return counted


def _run_backend(coco_gt: Any, dets: list[dict[str, Any]], image_id: np.ndarray, iou_type: str,
                 img_ids: Sequence[int] | None, backend: str, timings: dict[str, float],
                 progress: bool) -> tuple[Any, list[str]]:
    """Runs the backend's COCOeval on prepared detections; returns it and its summary lines."""
    lines: list[str] = []
    sink = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sink):
        if backend == "faster-coco-eval":
            from faster_coco_eval.core.faster_eval_api import COCOeval_faster

            coco_dt = _fce_detections(coco_gt, dets, image_id)
            # separate_eval=False (its default): matching and accumulation in one C++ call; separately they
            # keep every per-image result alive in between (measured: +0.5 GiB and slower at val2017 scale)
            coco_eval = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=lambda *a, **k: None)
        else:
            from pycocotools.cocoeval import COCOeval

            coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_gt, backend)
            coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        if img_ids is not None:
            coco_eval.params.imgIds = [int(i) for i in img_ids]
    timings["prepare"] = timings.get("prepare", 0.0) + time.perf_counter() - t0
    what = f"COCO evaluate ({iou_type}, {backend})"
    with progress_bar(desc=f"evaluate {iou_type}", unit="pair", enabled=progress) as bar:
        counter = _Progress(what, bar)
        if backend == "faster-coco-eval":
            coco_eval.computeIoU = counter.wrap(coco_eval.computeIoU,
                                                lambda: len(getattr(coco_eval, "_nonempty_iou_pairs", ()) or ()))
        else:
            n_pairs = len(coco_eval.params.imgIds) * len(coco_eval.params.catIds)
            coco_eval.computeIoU = counter.wrap(coco_eval.computeIoU, lambda: n_pairs)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sink):
            coco_eval.evaluate()
        t1 = time.perf_counter()
    with contextlib.redirect_stdout(sink):
        coco_eval.accumulate()
    t2 = time.perf_counter()
    if backend == "faster-coco-eval":
        # evaluate() computes the IoUs (Python loop, timed up to the last pair) and then, in one C++ call,
        # matches and accumulates: that call is reported as "accumulate"
        t_iou = counter.last if counter.last is not None else t0
        timings["evaluate"] = timings.get("evaluate", 0.0) + t_iou - t0
        timings["accumulate"] = timings.get("accumulate", 0.0) + t2 - t_iou
    else:
        timings["evaluate"] = timings.get("evaluate", 0.0) + t1 - t0
        timings["accumulate"] = timings.get("accumulate", 0.0) + t2 - t1
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if backend == "faster-coco-eval":
            coco_eval.print_function = lines.append
        coco_eval.summarize()
    lines.extend(buf.getvalue().splitlines())
    # faster-coco-eval prints two more lines (AR at IoU 0.50 and 0.75, its all_stats[12:14]): the table
    # stays pycocotools' 12 lines
    return coco_eval, lines[:len(METRIC_NAMES)]


def _empty_results(coco_gt: Any, backend: str) -> Any:
    return _quiet_coco({"images": list(coco_gt.dataset["images"]),
                        "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}, backend)


def _per_category_ap(coco_eval: Any) -> dict[int, float]:
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


def _plot_pr_curve(coco_eval: Any, iou_type: str, path: Path) -> bool:
    """Writes the category-averaged precision-recall curves; returns False if nothing to plot."""
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # [T, R, K], area all, maxDets 100
    valid = precision[0, 0, :] > -1  # a category is all -1 or not at all (no GT)
    if not valid.any():
        return False
    from matplotlib.figure import Figure  # lazy: matplotlib is slow to import; no pyplot state

    iou_thrs = np.asarray(coco_eval.params.iouThrs)
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
    with writing(path, "evaluation plot"):  # a full disk: one line naming the file
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), durable=False)
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


def _timings_line(iou_type: str, timings: Mapping[str, float]) -> str:
    return f"COCO evaluation ({iou_type}) stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())


def evaluate_prepared(
    coco_gt: Any,
    results: list[dict[str, Any]],
    image_id: np.ndarray,
    iou_types: Sequence[str],
    *,
    img_ids: Sequence[int] | None,
    names: Mapping[int, str],
    output_dir: Path | None,
    backend: str,
    timings: dict[str, float] | None = None,
    progress: bool = True,
    in_place: bool = False,
    box_area: np.ndarray | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Evaluates validated results; logs the tables and writes metrics.json / PR plots.

    Args:
        coco_gt: The private ground truth (:func:`load_coco_gt`) of ``backend``.
        results: Validated result dicts (:func:`_validate_results`).
        image_id: Their image ids as a column.
        iou_types: What to evaluate.
        img_ids: The images to evaluate (``None``: all of the annotations').
        names: Category id -> display name.
        output_dir: Where ``metrics.json`` and ``pr_curve_<iou_type>.png`` go (``None``: nowhere).
        backend: A resolved backend (:func:`resolve_backend`).
        timings: Stage times measured before (load, validate), reported with the evaluation's.
        progress: Allow the progress bar (shown only on a terminal).
        in_place: The result dicts may be modified (the last iou type reuses them instead of copying).
        box_area: ``w * h`` of the results' boxes, if already computed (validation computes it).

    Returns:
        ``({iou_type: metrics}, {iou_type: the COCOeval object})``.
    """
    metrics: dict[str, dict[str, float]] = {}
    evals: dict[str, Any] = {}
    report: dict[str, Any] = {}
    n_images = len(img_ids) if img_ids is not None else len(coco_gt.getImgIds())
    n_results = len(results)
    before = dict(timings or {})
    all_timings: dict[str, dict[str, float]] = {}
    for k, iou_type in enumerate(iou_types):
        stage = dict(before) if k == 0 else {}
        t0 = time.perf_counter()
        with _gc_paused():
            dets = _detections_for(results, iou_type, in_place=in_place and k == len(iou_types) - 1,
                                   box_area=box_area)
            stage["prepare"] = time.perf_counter() - t0
            coco_eval, lines = _run_backend(coco_gt, dets, image_id, iou_type, img_ids, backend, stage, progress)
        del dets
        t0 = time.perf_counter()
        evals[iou_type] = coco_eval
        stats = [float(s) for s in coco_eval.stats[:len(METRIC_NAMES)]]
        per_cat = _per_category_ap(coco_eval)
        named = dict(zip(METRIC_NAMES, stats))
        per_cat_named = {f"AP-{names.get(c, str(c))}": ap for c, ap in per_cat.items()}
        metrics[iou_type] = {**named, **per_cat_named}
        log_report(_log, "\n".join([
            f"COCO evaluation ({iou_type}), {n_images} images, {n_results} detections ({backend}):",
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
        stage["report"] = time.perf_counter() - t0
        all_timings[iou_type] = {key: round(v, 3) for key, v in stage.items()}
        _note(_timings_line(iou_type, stage))
    if output_dir is not None:
        out = {"num_images": n_images, "num_detections": n_results, "units": "fraction", "backend": backend,
               **report, "timings_s": all_timings}
        with writing(output_dir / METRICS_FILENAME, "evaluation file"):
            atomic_write(output_dir / METRICS_FILENAME, json.dumps(_json_safe(out), indent=2), durable=False)
    return metrics, evals


def evaluate_results_json(
    results_json: str | Path | Sequence[Mapping[str, Any]],
    annotations_json: Any,
    *,
    iou_types: Iterable[str] | None = None,
    output_dir: str | Path | None = None,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    backend: str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluates a COCO results file against an instances file, with pycocotools' numbers.

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
        class_names: As for :class:`~resnet_det.evaluation.COCOEvaluator`.
        backend: ``"faster-coco-eval"`` (default) or ``"pycocotools"``; see :func:`resolve_backend`.
        progress: Allow the progress bar (shown only when stderr is a terminal).

    Returns:
        ``{iou_type: metrics}`` as :meth:`~resnet_det.evaluation.COCOEvaluator.evaluate` returns them.

    Raises:
        FileNotFoundError: A file does not exist.
        ValueError: A file is not JSON, the results are empty or malformed, or they refer to images
            or categories that are not in the annotations; an unknown backend.
    """
    backend = resolve_backend(backend)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with _gc_paused():
        results = load_results_json(results_json)
        types = _infer_iou_types(results) if iou_types is None else _check_iou_types(iou_types)
        coco_gt = load_coco_gt(annotations_json, iou_types=types, backend=backend)
        timings["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        where = f"results file {results_json}" if isinstance(results_json, (str, Path)) else "results"
        cols = _validate_results(results, coco_gt, types, where)
        _report_uncounted(cols, where)
        timings["validate"] = time.perf_counter() - t0
    metrics, _ = evaluate_prepared(
        coco_gt, results, cols.image_id, types, img_ids=None, names=_category_names(coco_gt, class_names),
        output_dir=Path(output_dir) if output_dir is not None else None, backend=backend, timings=timings,
        progress=progress, in_place=True, box_area=cols.box_area,
    )
    return metrics

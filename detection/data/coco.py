"""COCO-format detection / instance segmentation dataset with validation.

The annotation file is read once, validated, and a *cleaned* copy is indexed by pycocotools
(``dataset.coco``), so that training targets and the evaluator see exactly the same ground truth.

Validation rules (checked before pycocotools builds its index, because pycocotools silently keeps
the last of duplicate ids and never matches annotation id 0 in evaluation):

Fatal (raise :class:`DatasetError`): the annotation file is missing, unreadable or not valid JSON;
its top level is not an object; ``images`` or ``categories`` is missing, not a list or empty; a
category lacks a positive integer ``id`` or a string ``name``, or two categories share an id; no
image is left after validation.

Recoverable (the entry is skipped, counted in :attr:`CocoDetection.report` under the key in
brackets, and listed in ONE summary log line when the dataset is opened):

* images: missing ``id``/``file_name``/``height``/``width`` [``image_missing_keys``]; id not a
  positive int, e.g. 0 [``image_bad_id``]; an id already used by an earlier image (the first one is
  kept) [``image_duplicate_id``]; height/width not positive integers [``image_bad_size``].
* annotations: missing ``id``/``image_id``/``category_id``/``bbox`` [``annotation_missing_keys``];
  id not a positive int, e.g. 0 [``annotation_bad_id``]; duplicate id (first kept)
  [``annotation_duplicate_id``]; ``image_id`` not in ``images`` [``annotation_unknown_image``];
  ``image_id`` of an image skipped above [``annotation_on_skipped_image``]; ``category_id`` not in
  ``categories`` [``annotation_unknown_category``]; ``bbox`` not 4 finite numbers or ``iscrowd``
  not 0/1 [``annotation_invalid_field``]; box width or height <= 0 [``box_degenerate``]; box
  exceeding the image by more than :data:`BOX_CLIP_TOLERANCE` (1 px) on any side
  [``box_outside_image``]; with ``with_masks`` (or semantic targets built from instances): no or
  invalid segmentation [``annotation_invalid_segmentation``].
* polygons with fewer than 6 coordinates, an odd number of them, or non-numeric values are removed
  from their annotation [``polygon_invalid``]; an annotation left with no polygon is then an
  invalid segmentation (above).
* images without non-crowd annotations, when ``keep_empty`` is false [``image_without_annotations``].

Repairs (counted under :attr:`DatasetReport.fixed`, applied to the cleaned index too): a box that
exceeds the image by at most 1 px (a rounding artefact, common in COCO) is clipped to the image
[``box_clipped``]; a missing ``iscrowd`` is set to 0 [``iscrowd_filled``]; a missing or non-numeric
``area`` is filled with the segmentation area (or the box area without segmentation)
[``area_filled``]; without masks, an invalid segmentation is removed from the cleaned index rather
than dropping a valid box [``segmentation_removed``].
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from pycocotools.coco import COCO

from .images import ImageLoadError, load_image

logger = logging.getLogger(__name__)

__all__ = ["BOX_CLIP_TOLERANCE", "CocoDetection", "DatasetError", "DatasetReport"]

#: A box may exceed the image by at most this many pixels on a side; it is then clipped, not skipped.
BOX_CLIP_TOLERANCE = 1.0

#: Human-readable phrase per report key (used in the summary log line).
SKIP_REASONS: dict[str, str] = {
    "image_missing_keys": "images missing a required key",
    "image_bad_id": "images whose id is not a positive integer",
    "image_duplicate_id": "images with a duplicate id",
    "image_bad_size": "images with invalid height/width",
    "annotation_missing_keys": "annotations missing a required key",
    "annotation_bad_id": "annotations whose id is not a positive integer",
    "annotation_duplicate_id": "annotations with a duplicate id",
    "annotation_unknown_image": "annotations on unknown images",
    "annotation_on_skipped_image": "annotations on skipped images",
    "annotation_unknown_category": "annotations of unknown categories",
    "annotation_invalid_field": "annotations with an invalid field",
    "box_degenerate": "boxes with width or height <= 0",
    "box_outside_image": "boxes outside the image",
    "annotation_invalid_segmentation": "annotations without a valid segmentation",
    "polygon_invalid": "invalid polygons removed",
    "image_without_annotations": "images without annotations (keep_empty=False)",
}
FIX_REASONS: dict[str, str] = {
    "box_clipped": f"boxes clipped to the image (exceeding by <= {BOX_CLIP_TOLERANCE:g} px)",
    "iscrowd_filled": "missing iscrowd set to 0",
    "area_filled": "missing area computed",
    "segmentation_removed": "invalid segmentations removed (with_masks=False)",
}

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox")
_MAX_EXAMPLES = 3


class DatasetError(ValueError):
    """A dataset cannot be used at all (fatal problem in the annotation file or configuration)."""


class _BadItem(Exception):
    """Internal: an item cannot be loaded (unreadable image, size mismatch, missing PNG)."""


@dataclass
class DatasetReport:
    """What validation found in an annotation file.

    Attributes:
        ann_file: The annotation file.
        images_in_file: Entries in ``images``.
        annotations_in_file: Entries in ``annotations``.
        num_categories: Categories (all valid; category problems are fatal).
        num_images: Items in the dataset (after validation and ``keep_empty``).
        num_annotations: Annotations kept in the cleaned index (crowd included).
        num_crowd: Crowd annotations kept (ignored regions, not training targets).
        skipped: Reason key -> number of skipped entries (see the module docstring for keys).
        fixed: Reason key -> number of repaired entries.
        examples: Reason key -> a few human-readable examples (ids and values).
    """

    ann_file: str
    images_in_file: int = 0
    annotations_in_file: int = 0
    num_categories: int = 0
    num_images: int = 0
    num_annotations: int = 0
    num_crowd: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, example: str) -> None:
        """Counts one skipped entry under ``reason`` and keeps a few examples."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self._example(reason, example)

    def fix(self, reason: str, example: str) -> None:
        """Counts one repaired entry under ``reason`` and keeps a few examples."""
        self.fixed[reason] = self.fixed.get(reason, 0) + 1
        self._example(reason, example)

    def _example(self, reason: str, example: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _MAX_EXAMPLES:
            ex.append(example)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "ann_file": self.ann_file,
            "images_in_file": self.images_in_file,
            "annotations_in_file": self.annotations_in_file,
            "num_categories": self.num_categories,
            "num_images": self.num_images,
            "num_annotations": self.num_annotations,
            "num_crowd": self.num_crowd,
            "skipped": dict(self.skipped),
            "fixed": dict(self.fixed),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def summary(self) -> str:
        """One line: what was loaded, then every skip/repair with its count and examples."""
        parts = [
            f"{self.ann_file}: {self.num_images} images, {self.num_annotations} annotations "
            f"({self.num_crowd} crowd), {self.num_categories} categories"
        ]
        if self.skipped:
            items = [
                f"{n} {SKIP_REASONS.get(k, k)} [{k}] (e.g. {'; '.join(self.examples.get(k, []))})"
                for k, n in self.skipped.items()
            ]
            parts.append("skipped: " + ", ".join(items))
        if self.fixed:
            items = [
                f"{n} {FIX_REASONS.get(k, k)} [{k}] (e.g. {'; '.join(self.examples.get(k, []))})"
                for k, n in self.fixed.items()
            ]
            parts.append("fixed: " + ", ".join(items))
        if not self.skipped and not self.fixed:
            parts.append("no problems found")
        return "; ".join(parts)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _all_finite_numbers(values: list[Any]) -> bool:
    """All elements are int/float (not bool) and finite; fast path for long polygon lists."""
    for v in values:
        t = type(v)
        if t is not float and t is not int:
            return False
    return math.isfinite(sum(values))


def _positive_size(x: Any) -> int | None:
    """A positive integer (an integral float is accepted), else None."""
    if _is_int(x) and x > 0:
        return int(x)
    if isinstance(x, float) and math.isfinite(x) and x > 0 and x == int(x):
        return int(x)
    return None


def _read_json(ann_file: Path) -> dict[str, Any]:
    if not ann_file.is_file():
        raise DatasetError(
            f"annotation file {str(ann_file)!r} not found (or not a file); pass the path of a COCO "
            "instances JSON, e.g. annotations/instances_val2017.json"
        )
    try:
        with open(ann_file, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"annotation file {str(ann_file)!r} is not valid JSON: {e.msg} at line {e.lineno}, "
            f"column {e.colno}; the file is probably truncated or corrupt: regenerate or re-download it"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read annotation file {str(ann_file)!r}: {e}") from e
    if not isinstance(raw, dict):
        raise DatasetError(
            f"annotation file {str(ann_file)!r}: top level is a {type(raw).__name__}, expected a JSON "
            "object with 'images', 'annotations' and 'categories' (COCO instances format)"
        )
    return raw


def _clean_categories(raw: dict[str, Any], where: str) -> list[dict[str, Any]]:
    cats = raw.get("categories")
    if not isinstance(cats, list) or not cats:
        what = "missing" if cats is None else ("empty" if isinstance(cats, list) else "not a list")
        raise DatasetError(
            f"{where}: 'categories' is {what}; a COCO instances file needs a non-empty list of "
            "{'id': <int>, 'name': <str>} entries"
        )
    seen: dict[int, int] = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or c["id"] <= 0:
            raise DatasetError(
                f"{where}: categories[{i}] has no positive integer 'id' (got {c!r}); fix the entry"
            )
        if not isinstance(c.get("name"), str) or not c["name"]:
            raise DatasetError(f"{where}: category id {c['id']} has no non-empty string 'name'; add one")
        if c["id"] in seen:
            raise DatasetError(
                f"{where}: category id {c['id']} appears twice (categories[{seen[c['id']]}] and "
                f"categories[{i}]); category ids must be unique"
            )
        seen[c["id"]] = i
    return [dict(c) for c in cats]


def _clean_images(raw: dict[str, Any], where: str, report: DatasetReport) -> tuple[list[dict], set[int]]:
    """Returns the valid images and the set of ids belonging to skipped image entries."""
    images = raw.get("images")
    if not isinstance(images, list) or not images:
        what = "missing" if images is None else ("empty" if isinstance(images, list) else "not a list")
        raise DatasetError(
            f"{where}: 'images' is {what}; a COCO file needs a non-empty list of "
            "{'id', 'file_name', 'height', 'width'} entries"
        )
    report.images_in_file = len(images)
    kept: dict[int, dict] = {}
    skipped_ids: set[int] = set()
    for i, im in enumerate(images):
        if not isinstance(im, dict):
            report.skip("image_missing_keys", f"images[{i}] is a {type(im).__name__}")
            continue
        missing = [k for k in _IMAGE_KEYS if k not in im]
        if missing:
            report.skip("image_missing_keys", f"images[{i}] (id {im.get('id')!r}) lacks {missing}")
            if _is_int(im.get("id")):
                skipped_ids.add(im["id"])
            continue
        iid = im["id"]
        if not _is_int(iid) or iid <= 0:
            report.skip("image_bad_id", f"images[{i}] {im.get('file_name')!r} has id {iid!r}")
            if _is_int(iid):
                skipped_ids.add(iid)
            continue
        if iid in kept:
            report.skip(
                "image_duplicate_id",
                f"id {iid}: {im.get('file_name')!r} (kept {kept[iid].get('file_name')!r})",
            )
            continue
        h, w = _positive_size(im["height"]), _positive_size(im["width"])
        if h is None or w is None or not isinstance(im["file_name"], str) or not im["file_name"]:
            report.skip(
                "image_bad_size",
                f"image id {iid} {im.get('file_name')!r}: height={im['height']!r} width={im['width']!r}",
            )
            skipped_ids.add(iid)
            continue
        kept[iid] = {**im, "height": h, "width": w}
    return list(kept.values()), skipped_ids - set(kept)


def _clean_polygons(
    segm: list, ann_id: int, image_id: int, report: DatasetReport
) -> list[list[float]]:
    valid = []
    for j, poly in enumerate(segm):
        ok = isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and _all_finite_numbers(poly)
        if ok:
            valid.append(poly)
        else:
            n = len(poly) if isinstance(poly, list) else type(poly).__name__
            report.skip(
                "polygon_invalid",
                f"annotation id {ann_id} (image {image_id}) polygon {j}: {n} coordinates "
                "(need an even number >= 6)",
            )
    return valid


def _check_rle(segm: dict, h: int, w: int) -> str | None:
    """Returns what is wrong with an RLE segmentation, or None."""
    size, counts = segm.get("size"), segm.get("counts")
    if not isinstance(size, list) or len(size) != 2 or list(size) != [h, w]:
        return f"RLE size {size!r} differs from the image size [{h}, {w}]"
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
            return "uncompressed RLE counts are not non-negative ints summing to height*width"
    elif not isinstance(counts, (str, bytes)):
        return f"RLE counts is a {type(counts).__name__}"
    return None


def _to_rle(segm: Any, h: int, w: int) -> dict[str, Any]:
    """A (validated) polygon list, uncompressed or compressed RLE as one compressed RLE."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, h, w)
    return segm


def _segmentation_area(segm: Any, h: int, w: int) -> float:
    return float(mask_utils.area(_to_rle(segm, h, w)))


def _clean_annotations(
    raw: dict[str, Any],
    images: dict[int, dict],
    skipped_image_ids: set[int],
    cat_ids: set[int],
    need_segmentation: bool,
    report: DatasetReport,
) -> list[dict]:
    anns = raw.get("annotations", [])
    if not isinstance(anns, list):
        raise DatasetError(f"{report.ann_file}: 'annotations' is a {type(anns).__name__}, expected a list")
    report.annotations_in_file = len(anns)
    seen: set[int] = set()
    kept: list[dict] = []
    for i, a in enumerate(anns):
        if not isinstance(a, dict):
            report.skip("annotation_missing_keys", f"annotations[{i}] is a {type(a).__name__}")
            continue
        missing = [k for k in _ANN_KEYS if k not in a]
        if missing:
            report.skip("annotation_missing_keys", f"annotations[{i}] (id {a.get('id')!r}) lacks {missing}")
            continue
        aid, iid, cid = a["id"], a["image_id"], a["category_id"]
        where = f"annotation id {aid!r} (image {iid!r})"
        if not _is_int(aid) or aid <= 0:
            report.skip("annotation_bad_id", f"annotations[{i}] (image {iid!r}) has id {aid!r}")
            continue
        if aid in seen:
            report.skip("annotation_duplicate_id", where)
            continue
        seen.add(aid)
        if iid not in images:
            key = "annotation_on_skipped_image" if iid in skipped_image_ids else "annotation_unknown_image"
            report.skip(key, f"{where}: image_id {iid!r}")
            continue
        if cid not in cat_ids:
            report.skip("annotation_unknown_category", f"{where}: category_id {cid!r}")
            continue
        bbox = a["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            report.skip("annotation_invalid_field", f"{where}: bbox {bbox!r} is not 4 finite numbers")
            continue
        iscrowd = a.get("iscrowd")
        if iscrowd is not None and iscrowd not in (0, 1):
            report.skip("annotation_invalid_field", f"{where}: iscrowd {iscrowd!r} is not 0 or 1")
            continue
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0:
            report.skip("box_degenerate", f"{where}: bbox {bbox!r}")
            continue
        h, w = images[iid]["height"], images[iid]["width"]
        tol = BOX_CLIP_TOLERANCE
        if x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol:
            report.skip("box_outside_image", f"{where}: bbox (xywh) {bbox!r} in a {w}x{h} image")
            continue
        ann = dict(a)
        if x < 0 or y < 0 or x + bw > w or y + bh > h:
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + bw, float(w)), min(y + bh, float(h))
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                report.skip("box_degenerate", f"{where}: bbox {bbox!r} is empty inside the image")
                continue
            ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            report.fix("box_clipped", f"{where}: {bbox!r} -> {ann['bbox']!r}")
        if iscrowd is None:
            ann["iscrowd"] = 0
            report.fix("iscrowd_filled", where)

        # Segmentation.
        segm = a.get("segmentation")
        problem: str | None = None
        if isinstance(segm, list) and segm:
            polys = _clean_polygons(segm, aid, iid, report)
            if polys:
                ann["segmentation"] = polys
            else:
                problem = "no valid polygon"
        elif isinstance(segm, dict):
            problem = _check_rle(segm, h, w)
        else:
            problem = "no segmentation" if segm in (None, []) else f"segmentation is a {type(segm).__name__}"
        if problem is not None:
            if need_segmentation:
                report.skip("annotation_invalid_segmentation", f"{where}: {problem}")
                continue
            if segm not in (None, []):
                ann["segmentation"] = []
                report.fix("segmentation_removed", f"{where}: {problem}")

        if not _is_number(a.get("area")):
            valid_segm = ann.get("segmentation")
            if problem is None and valid_segm:
                ann["area"] = _segmentation_area(valid_segm, h, w)
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            report.fix("area_filled", f"{where}: area {ann['area']:.1f}")
        kept.append(ann)
    return kept


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format dataset returning torchvision-style ``(image, target)`` pairs.

    Each item is:

    * ``image``: ``float32`` tensor ``[3, H, W]``, RGB in ``[0, 1]`` (after ``transforms``).
    * ``target``: dict with

      - ``boxes``: ``float32 [K, 4]``, xyxy in absolute pixels of the returned image;
      - ``labels``: ``int64 [K]``, contiguous ``1..num_classes`` (0 is background), or the COCO
        category ids when ``contiguous_ids=False``;
      - ``image_id``: python ``int`` (the COCO image id);
      - ``orig_size``: ``(H, W)`` of the file on disk (EXIF-oriented), tuple of ints;
      - ``masks``: ``uint8 [K, H, W]`` (only with ``with_masks``);
      - ``sem_seg``: ``int64 [H, W]`` (only with ``with_semantic``): 0 background,
        labels of thing classes, 255 ignore (crowd regions).

    Crowd annotations (``iscrowd=1``) are not part of the targets; they remain in :attr:`coco`, where
    pycocotools evaluation treats them as ignore regions, and are painted 255 in ``sem_seg``.

    **Unreadable items.** If an image cannot be read (missing/corrupt file), its size on disk differs
    from the annotation file, or its semantic PNG is missing/unreadable/of another size, a warning
    names the file (once per file and process), it is counted in :attr:`num_unreadable` and the
    dataset returns the next readable item (index + 1, wrapping) instead; a zero image is never
    returned. With DataLoader workers each process has its own count. If no item is readable,
    :class:`DatasetError` is raised.

    Args:
        image_root: Folder that ``file_name`` entries are relative to.
        ann_file: COCO instances JSON file.
        training: Selects the ``keep_empty`` default (drop empty images when training).
        keep_empty: Keep images without non-crowd annotations. ``None``: ``not training``.
        with_masks: Return instance masks (decoded from polygons or RLE); annotations without a
            valid segmentation are then skipped at validation.
        with_semantic: Return ``sem_seg``: from ``semantic_root`` PNGs when given, else painted
            from the instance masks (larger instances first, so smaller ones stay visible).
        semantic_root: Folder of ``<file stem>.png`` label maps (values = labels, 255 = ignore;
            ``L``, ``P`` or 16-bit PNGs); requires ``with_semantic=True``.
        transforms: Callable ``(image, target) -> (image, target)`` on numpy data: ``image``
            ``uint8 [H, W, 3]`` RGB; target ``boxes`` ``float32 [K, 4]`` xyxy, ``labels`` ``int64
            [K]``, optional ``masks`` ``uint8 [K, H, W]`` and ``sem_seg`` ``uint8 [H, W]``; see
            :func:`detection.data.transforms.build_transforms`. Tensors are made afterwards.
        contiguous_ids: Map category ids to ``1..K`` (sorted by id). ``False``: labels are the
            category ids themselves (torchvision's COCO checkpoints use 91 outputs this way).

    Raises:
        DatasetError: On fatal problems (see the module docstring) or inconsistent arguments.
    """

    def __init__(
        self,
        image_root: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        *,
        training: bool,
        keep_empty: bool | None = None,
        with_masks: bool = False,
        with_semantic: bool = False,
        semantic_root: str | os.PathLike[str] | None = None,
        transforms: Callable[[np.ndarray, dict[str, Any]], tuple[np.ndarray, dict[str, Any]]] | None = None,
        contiguous_ids: bool = True,
    ) -> None:
        if semantic_root is not None and not with_semantic:
            raise DatasetError(
                f"semantic_root={str(semantic_root)!r} was given but with_semantic=False; pass "
                "with_semantic=True to read semantic labels, or drop semantic_root"
            )
        self.image_root = Path(image_root)
        self.ann_file = Path(ann_file)
        self.training = training
        self.keep_empty = (not training) if keep_empty is None else keep_empty
        self.with_masks = with_masks
        self.with_semantic = with_semantic
        self.semantic_root = Path(semantic_root) if semantic_root is not None else None
        self.transforms = transforms
        self.contiguous_ids = contiguous_ids
        if self.semantic_root is not None and not self.semantic_root.is_dir():
            raise DatasetError(f"semantic_root {str(self.semantic_root)!r} is not a folder")

        where = str(self.ann_file)
        report = DatasetReport(ann_file=where)
        raw = _read_json(self.ann_file)
        cats = _clean_categories(raw, where)
        images, skipped_image_ids = _clean_images(raw, where, report)
        images_by_id = {im["id"]: im for im in images}
        cat_ids = sorted(c["id"] for c in cats)
        need_segm = with_masks or (with_semantic and semantic_root is None)
        anns = _clean_annotations(raw, images_by_id, skipped_image_ids, set(cat_ids), need_segm, report)

        # Label maps.
        names = {c["id"]: c["name"] for c in cats}
        if contiguous_ids:
            self.cat_id_to_label: dict[int, int] = {cid: i + 1 for i, cid in enumerate(cat_ids)}
            self.class_names: list[str] = ["background"] + [names[cid] for cid in cat_ids]
        else:
            self.cat_id_to_label = {cid: cid for cid in cat_ids}
            self.class_names = ["background"] + ["N/A"] * max(cat_ids)
            for cid in cat_ids:
                self.class_names[cid] = names[cid]
        self.label_to_cat_id: dict[int, int] = {v: k for k, v in self.cat_id_to_label.items()}
        self.num_classes: int = len(cat_ids)
        if with_semantic and len(self.class_names) > 255:
            raise DatasetError(
                f"{where}: semantic targets store labels in uint8 with 255 = ignore, but the largest "
                f"label is {len(self.class_names) - 1}; use contiguous_ids=True or fewer categories"
            )

        # Items.
        with_instances = {a["image_id"] for a in anns if not a.get("iscrowd", 0)}
        ids = []
        for iid in sorted(images_by_id):
            if iid in with_instances or self.keep_empty:
                ids.append(iid)
            else:
                report.skip("image_without_annotations", f"image id {iid} {images_by_id[iid]['file_name']!r}")
        if not ids:
            raise DatasetError(
                f"{where}: no usable image left after validation ({report.images_in_file} in the file; "
                f"skipped: {report.skipped or 'none'}). Fix the file, or pass keep_empty=True if all "
                "images are legitimately unannotated"
            )
        self.ids: list[int] = ids

        cleaned = {
            "info": raw.get("info", {}),
            "licenses": raw.get("licenses", []),
            "images": images,
            "annotations": anns,
            "categories": cats,
        }
        self.coco = COCO()
        self.coco.dataset = cleaned
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

        report.num_categories = len(cats)
        report.num_images = len(ids)
        report.num_annotations = len(anns)
        report.num_crowd = sum(1 for a in anns if a.get("iscrowd", 0))
        self.report = report
        (logger.warning if report.skipped else logger.info)("%s", report.summary())

        self.num_unreadable = 0
        self._unreadable: set[int] = set()

    # ------------------------------------------------------------------ public helpers
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_labels(self) -> int:
        """Classifier outputs including background: ``num_classes + 1``, or ``max category id + 1``
        with ``contiguous_ids=False`` (91 for COCO)."""
        return len(self.class_names)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every item, from the annotation file (no image is opened)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def image_info(self, index: int) -> dict[str, Any]:
        """The cleaned COCO ``images`` entry of item ``index``."""
        return self.coco.imgs[self.ids[index]]

    def image_path(self, index: int) -> Path:
        """The image file of item ``index``."""
        return self.image_root / self.image_info(index)["file_name"]

    # ------------------------------------------------------------------ loading
    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        n = len(self.ids)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._unreadable:
                continue
            try:
                return self._load(i)
            except _BadItem as e:
                self._unreadable.add(i)
                self.num_unreadable = len(self._unreadable)
                logger.warning("skipping unreadable item %d (image id %d): %s; returning the next one",
                               i, self.ids[i], e)
        raise DatasetError(
            f"{self.ann_file}: none of the {n} images could be read (e.g. {self.image_path(index)}); "
            f"check image_root={str(self.image_root)!r}"
        )

    def _decode(self, segms: list[Any], h: int, w: int) -> np.ndarray:
        """Decodes polygon / RLE segmentations to ``uint8 [N, h, w]``."""
        if not segms:
            return np.zeros((0, h, w), dtype=np.uint8)
        rles = [_to_rle(s, h, w) for s in segms]
        with warnings.catch_warnings():  # pycocotools' Cython __array__ vs numpy 2 copy keyword
            warnings.simplefilter("ignore", DeprecationWarning)
            masks = mask_utils.decode(rles)  # [h, w, N], Fortran order
        return np.ascontiguousarray(masks.transpose(2, 0, 1), dtype=np.uint8)

    def _read_semantic(self, info: dict[str, Any], h: int, w: int) -> np.ndarray:
        assert self.semantic_root is not None
        path = self.semantic_root / (Path(info["file_name"]).stem + ".png")
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                    raise DatasetError(
                        f"semantic PNG {str(path)!r} has mode {im.mode}; it must be a single-channel "
                        "label map (values = labels, 255 = ignore), not a colour image"
                    )
                sem = np.asarray(im).astype(np.int64)
        except DatasetError:
            raise
        except (OSError, SyntaxError, ValueError) as e:
            raise _BadItem(f"semantic PNG {str(path)!r}: {e}") from e
        if sem.shape != (h, w):
            raise _BadItem(f"semantic PNG {str(path)!r} is {sem.shape[1]}x{sem.shape[0]}, image is {w}x{h}")
        bad = np.unique(sem[(sem >= self.num_labels) & (sem != 255) | (sem < 0)])
        if bad.size:
            raise DatasetError(
                f"semantic PNG {str(path)!r} (image id {info['id']}) has values {bad[:10].tolist()} that "
                f"are not labels 0..{self.num_labels - 1} or 255 (ignore); the PNG must store dataset "
                "labels, check contiguous_ids"
            )
        return sem.astype(np.uint8)

    def _load(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        path = self.image_root / info["file_name"]
        try:
            image = load_image(path)
        except ImageLoadError as e:
            raise _BadItem(str(e)) from e
        h, w = image.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            raise _BadItem(
                f"{str(path)!r} is {w}x{h} on disk but {info['width']}x{info['height']} in "
                f"{self.ann_file}; fix the annotation file (or the EXIF orientation of the image)"
            )
        anns = self.coco.imgToAnns.get(img_id, [])
        objs = [a for a in anns if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in objs], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = np.array([self.cat_id_to_label[a["category_id"]] for a in objs], dtype=np.int64)
        target: dict[str, Any] = {"boxes": boxes, "labels": labels}
        masks = None
        if self.with_masks or (self.with_semantic and self.semantic_root is None):
            masks = self._decode([a["segmentation"] for a in objs], h, w)
            if self.with_masks:
                target["masks"] = masks
        if self.with_semantic:
            if self.semantic_root is not None:
                target["sem_seg"] = self._read_semantic(info, h, w)
            else:
                assert masks is not None
                sem = np.zeros((h, w), dtype=np.uint8)
                crowd = self._decode([a["segmentation"] for a in anns if a.get("iscrowd", 0)], h, w)
                sem[crowd.any(axis=0)] = 255
                areas = masks.reshape(len(objs), -1).sum(1)
                for k in np.argsort(-areas, kind="stable"):
                    sem[masks[k] > 0] = labels[k]
                target["sem_seg"] = sem
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        out: dict[str, Any] = {
            "boxes": torch.as_tensor(np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(target["labels"], dtype=np.int64)),
            "image_id": int(img_id),
            "orig_size": (int(h), int(w)),
        }
        if "masks" in target:
            out["masks"] = torch.as_tensor(np.ascontiguousarray(target["masks"], dtype=np.uint8))
        if "sem_seg" in target:
            out["sem_seg"] = torch.as_tensor(np.asarray(target["sem_seg"]).astype(np.int64))
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        return tensor, out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, "
            f"ann_file={str(self.ann_file)!r}, training={self.training}, with_masks={self.with_masks}, "
            f"with_semantic={self.with_semantic})"
        )

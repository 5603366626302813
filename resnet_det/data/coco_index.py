"""Reading, validating and indexing a COCO instances file into compact columnar arrays.

:func:`build_index` is what :class:`~resnet_det.data.coco.CocoDetection` runs on its annotation file (or
loads from the cache of :mod:`resnet_det.data.index_cache`). It is built for train2017-sized files
(118k images, 860k polygon instances): the JSON is parsed with the cyclic garbage collector paused (on
millions of fresh containers it would otherwise run over and over, more than doubling the parse time),
every field is pulled out as one column with C-speed passes (``map``, ``set``, ``itertools.chain``,
``np.fromiter``), the rules are checked on NumPy arrays, and the per-annotation Python objects are freed
as soon as their values are copied out. What stays is a :class:`CocoIndex`: a few NumPy arrays (polygons
as one flat ``float64`` coordinate array with offsets, crowd masks as compressed RLE bytes), about a
fifth of what pycocotools' ``COCO`` keeps for the same file, and nothing that DataLoader workers would
copy page by page through reference counts.

Validation rules (pycocotools silently keeps the last of duplicate ids and never matches annotation id 0
in evaluation, so these are checked first):

Fatal (:class:`DatasetError`, one line naming the file, the field and the fix): the annotation file is
missing, unreadable, not UTF-8/16/32 text or not valid JSON (a UTF-8 byte-order mark is fine); its top
level is not an object; ``images`` or ``categories`` is missing, not a list or empty; ``annotations`` is
not a list; a category is not an object, lacks a positive integer ``id`` or a non-empty string ``name``,
or two categories share an id.

Recoverable (the entry is skipped, counted in :class:`DatasetReport` under the key in brackets; the first
rule that fails names the reason):

* images: not an object, or missing ``id``/``file_name``/``height``/``width`` [``image_missing_keys``];
  id not a positive (64-bit) integer, e.g. 0 or ``"12"`` [``image_bad_id``]; height/width not positive
  integers (integral floats pass) [``image_bad_size``]; ``file_name`` not a non-empty string naming a file
  inside the image folder (absolute, ``..``, a drive, a NUL) [``image_bad_file_name``]; an id already used
  by an earlier valid image (the first is kept) [``image_duplicate_id``].
* annotations: not an object, or missing ``id``/``image_id``/``category_id``/``bbox``
  [``annotation_missing_keys``]; id not a positive integer [``annotation_bad_id``]; duplicate id (first
  kept) [``annotation_duplicate_id``]; ``image_id`` of an image skipped above
  [``annotation_on_skipped_image``] or of no image [``annotation_unknown_image``]; ``category_id`` not in
  ``categories`` [``annotation_unknown_category``]; ``bbox`` not 4 finite numbers, or ``iscrowd`` not 0/1
  [``annotation_invalid_field``]; box width or height <= 0, or nothing left inside the image
  [``box_degenerate``]; box exceeding the image by more than :data:`BOX_CLIP_TOLERANCE` on a side
  [``box_outside_image``]; with ``need_segmentation``: no valid segmentation
  [``annotation_invalid_segmentation``].
* polygons with fewer than 6 coordinates, an odd number, or values that are not finite numbers are removed
  from their annotation [``polygon_invalid``]; an RLE whose size is not the image's or whose counts do not
  cover exactly height x width pixels (a malformed RLE would make pycocotools write past its buffer) is
  not a valid segmentation.

Repairs (:attr:`DatasetReport.fixed`): a box exceeding the image by at most 1 px is clipped
[``box_clipped``]; a missing ``iscrowd`` is 0 [``iscrowd_filled``]; a missing or non-numeric ``area`` is
the segmentation's (or the box's) [``area_filled``]; without ``need_segmentation`` an invalid
segmentation is dropped and the box kept [``segmentation_removed``].

What the index keeps of each entry: images ``id, file_name, height, width``; annotations ``id,
category_id, bbox, area, iscrowd, segmentation`` (polygons, or RLE with compressed counts); categories as
given; ``info`` and ``licenses``. Other fields (``coco_url``, ``keypoints``, ...) are not kept.
"""

from __future__ import annotations

import codecs
import gc
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

logger = logging.getLogger(__name__)

__all__ = [
    "BOX_CLIP_TOLERANCE",
    "FIX_REASONS",
    "SKIP_REASONS",
    "CocoIndex",
    "DatasetError",
    "DatasetReport",
    "build_index",
    "read_json_file",
    "safe_file_name",
]

#: A box may exceed the image by at most this many pixels on a side; it is then clipped, not skipped.
BOX_CLIP_TOLERANCE = 1.0

#: Human-readable phrase per report key (used in the summary log line).
SKIP_REASONS: dict[str, str] = {
    "image_missing_keys": "images missing a required key",
    "image_bad_id": "images whose id is not a positive integer",
    "image_bad_size": "images with invalid height/width",
    "image_bad_file_name": "images whose file_name is not a relative path inside the image folder",
    "image_duplicate_id": "images with a duplicate id",
    "annotation_missing_keys": "annotations missing a required key",
    "annotation_bad_id": "annotations whose id is not a positive integer",
    "annotation_duplicate_id": "annotations with a duplicate id",
    "annotation_on_skipped_image": "annotations on skipped images",
    "annotation_unknown_image": "annotations on unknown images",
    "annotation_unknown_category": "annotations of unknown categories",
    "annotation_invalid_field": "annotations with an invalid field",
    "box_degenerate": "boxes with width or height <= 0",
    "box_outside_image": "boxes outside the image",
    "annotation_invalid_segmentation": "annotations without a valid segmentation",
    "polygon_invalid": "invalid polygons removed",
    "image_without_annotations": "images without annotations (keep_empty=False)",
    "image_unreadable": "images that could not be read when loaded (skipped)",
}
FIX_REASONS: dict[str, str] = {
    "box_clipped": f"boxes clipped to the image (exceeding by <= {BOX_CLIP_TOLERANCE:g} px)",
    "iscrowd_filled": "missing iscrowd set to 0",
    "area_filled": "missing area computed",
    "segmentation_removed": "invalid segmentations removed (with_masks=False)",
}

_MAX_EXAMPLES = 3
_INT64_MAX = 2**63 - 1
_SIZE_MAX = 2**31 - 1


class DatasetError(ValueError):
    """A dataset cannot be used at all (fatal problem in the annotation file or configuration)."""


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
    reasons: dict[str, str] = field(default_factory=dict)
    """Reason key -> its description, for keys that are not in SKIP_REASONS / FIX_REASONS (other formats')."""

    def skip(self, reason: str, example: str, count: int = 1) -> None:
        """Counts ``count`` skipped entries under ``reason`` and keeps a few examples."""
        self.skipped[reason] = self.skipped.get(reason, 0) + count
        self._example(reason, example)

    def fix(self, reason: str, example: str, count: int = 1) -> None:
        """Counts ``count`` repaired entries under ``reason`` and keeps a few examples."""
        self.fixed[reason] = self.fixed.get(reason, 0) + count
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
            "reasons": dict(self.reasons),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetReport:
        """The inverse of :meth:`as_dict`."""
        return cls(**{**d, "skipped": dict(d["skipped"]), "fixed": dict(d["fixed"]),
                      "examples": {k: list(v) for k, v in d["examples"].items()}})

    def summary(self) -> str:
        """One line: what was loaded, then every skip/repair with its count and examples."""
        parts = [
            f"{self.ann_file}: {self.num_images} images, {self.num_annotations} annotations "
            f"({self.num_crowd} crowd), {self.num_categories} categories"
        ]
        if self.skipped:
            items = [
                f"{n} {SKIP_REASONS.get(k) or self.reasons.get(k, k)} [{k}] "
                f"(e.g. {'; '.join(self.examples.get(k, []))})"
                for k, n in self.skipped.items()
            ]
            parts.append("skipped: " + ", ".join(items))
        if self.fixed:
            items = [
                f"{n} {FIX_REASONS.get(k) or self.reasons.get(k, k)} [{k}] "
                f"(e.g. {'; '.join(self.examples.get(k, []))})"
                for k, n in self.fixed.items()
            ]
            parts.append("fixed: " + ", ".join(items))
        if not self.skipped and not self.fixed:
            parts.append("no problems found")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------- the index
#: Arrays of a :class:`CocoIndex`: name -> (dtype, number of dimensions).
INDEX_ARRAYS: dict[str, tuple[str, int]] = {
    "image_id": ("<i8", 1), "height": ("<i4", 1), "width": ("<i4", 1),
    "file_name_start": ("<i8", 1), "file_name_bytes": ("|u1", 1), "ann_start": ("<i8", 1),
    "ann_id": ("<i8", 1), "category_id": ("<i8", 1), "bbox": ("<f8", 2), "area": ("<f8", 1),
    "iscrowd": ("|u1", 1), "poly_first": ("<i8", 1), "poly_count": ("<i4", 1), "coord_start": ("<i8", 1),
    "coords": ("<f8", 1),
    "rle_start": ("<i8", 1), "rle_bytes": ("|u1", 1),
}


@dataclass(eq=False)
class CocoIndex:
    """A validated COCO instances file as columnar arrays.

    Images are sorted by id; annotations are grouped by image (in that order) and keep their file order
    within an image. ``*_start`` arrays are offsets with one more entry than the things they index: the
    annotations of image ``i`` are ``ann_start[i]:ann_start[i + 1]``, the coordinates of polygon ``p``
    ``coords[coord_start[p]:coord_start[p + 1]]`` (x0, y0, x1, y1, ...), the compressed RLE counts of
    annotation ``a`` ``rle_bytes[rle_start[a]:rle_start[a + 1]]`` (empty when it has none). The polygons stay
    in file order (so that they are copied out of the parsed JSON in memory order, and never reordered):
    annotation ``a`` has polygons ``poly_first[a]`` to ``poly_first[a] + poly_count[a] - 1``.

    Attributes:
        arrays: Name -> array, the keys of :data:`INDEX_ARRAYS`.
        categories: The ``categories`` entries, in file order.
        info: The file's ``info`` (``{}`` if absent).
        licenses: The file's ``licenses`` (``[]`` if absent).
        report: What validation found.
    """

    arrays: dict[str, np.ndarray]
    categories: list[dict[str, Any]]
    info: Any
    licenses: Any
    report: DatasetReport

    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("arrays")
        if arrays is not None and name in arrays:
            return arrays[name]
        raise AttributeError(name)

    @property
    def num_images(self) -> int:
        """Valid images."""
        return len(self.arrays["image_id"])

    @property
    def num_annotations(self) -> int:
        """Valid annotations (crowd included)."""
        return len(self.arrays["ann_id"])

    def file_name(self, i: int) -> str:
        """``file_name`` of image ``i``."""
        s, e = self.arrays["file_name_start"][i : i + 2]
        return self.arrays["file_name_bytes"][s:e].tobytes().decode("utf-8", "surrogatepass")

    def polygons(self, a: int) -> list[np.ndarray]:
        """The polygons of annotation ``a`` (``float64`` views, x0, y0, x1, y1, ...)."""
        ps = int(self.arrays["poly_first"][a])
        pe = ps + int(self.arrays["poly_count"][a])
        cs = self.arrays["coord_start"]
        coords = self.arrays["coords"]
        return [coords[cs[p] : cs[p + 1]] for p in range(ps, pe)]

    def rle(self, a: int, h: int, w: int) -> dict[str, Any] | None:
        """The RLE of annotation ``a`` (``{"size": [h, w], "counts": bytes}``), or None."""
        s, e = self.arrays["rle_start"][a : a + 2]
        if s == e:
            return None
        return {"size": [int(h), int(w)], "counts": self.arrays["rle_bytes"][s:e].tobytes()}

    def segmentation(self, a: int, h: int, w: int) -> Any:
        """Annotation ``a``'s segmentation as COCO JSON writes it (polygon lists, an RLE dict or ``[]``)."""
        rle = self.rle(a, h, w)
        if rle is not None:
            return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        return [p.tolist() for p in self.polygons(a)]

    def to_coco_dict(self) -> dict[str, Any]:
        """The cleaned file as a COCO instances dict (what pycocotools' ``COCO.dataset`` holds)."""
        a = self.arrays
        images, annotations = [], []
        ids, hs, ws, starts = a["image_id"].tolist(), a["height"].tolist(), a["width"].tolist(), a["ann_start"]
        ann_ids, cats, boxes = a["ann_id"].tolist(), a["category_id"].tolist(), a["bbox"].tolist()
        areas, crowd = a["area"].tolist(), a["iscrowd"].tolist()
        for i, iid in enumerate(ids):
            images.append({"id": iid, "file_name": self.file_name(i), "height": hs[i], "width": ws[i]})
            for k in range(int(starts[i]), int(starts[i + 1])):
                annotations.append({"id": ann_ids[k], "image_id": iid, "category_id": cats[k], "bbox": boxes[k],
                                    "area": areas[k], "iscrowd": crowd[k],
                                    "segmentation": self.segmentation(k, hs[i], ws[i])})
        return {"info": self.info, "licenses": self.licenses, "images": images, "annotations": annotations,
                "categories": [dict(c) for c in self.categories]}

    def check(self) -> None:
        """Checks that the arrays fit together (offsets monotonic and in range): run on every cache load.

        Raises:
            ValueError: Naming the first inconsistency.
        """
        a = self.arrays
        n, m = len(a["image_id"]), len(a["ann_id"])

        def offsets(name: str, count: int, total: int) -> None:
            o = a[name]
            if len(o) != count + 1 or (count + 1 and (o[0] != 0 or o[-1] != total)) or bool(np.any(np.diff(o) < 0)):
                raise ValueError(f"offsets {name!r} do not fit ({len(o)} entries for {count}, total {total})")

        for name in ("height", "width"):
            if len(a[name]) != n:
                raise ValueError(f"{name!r} has {len(a[name])} entries for {n} images")
        for name in ("category_id", "area", "iscrowd", "poly_first", "poly_count"):
            if len(a[name]) != m:
                raise ValueError(f"{name!r} has {len(a[name])} entries for {m} annotations")
        if a["bbox"].shape != (m, 4):
            raise ValueError(f"'bbox' has shape {a['bbox'].shape} for {m} annotations")
        offsets("file_name_start", n, len(a["file_name_bytes"]))
        offsets("ann_start", n, m)
        first, count = a["poly_first"], a["poly_count"]
        if m and (int(first.min()) < 0 or int(count.min()) < 0
                  or int((first + count).max()) > len(a["coord_start"]) - 1):
            raise ValueError("polygon ranges 'poly_first'/'poly_count' do not fit")
        offsets("coord_start", len(a["coord_start"]) - 1, len(a["coords"]))
        offsets("rle_start", m, len(a["rle_bytes"]))


# --------------------------------------------------------------------------------------------- reading
def read_json_file(path: Path) -> Any:
    """Reads a JSON file (UTF-8 with or without a byte-order mark, UTF-16 or UTF-32).

    Only one copy of the text is alive while it is parsed (the bytes are dropped once decoded), and the
    caller should pause the garbage collector (see the module docstring).

    Raises:
        DatasetError: Missing, not a file, unreadable, empty, not text in a JSON encoding, not JSON, or
            nested too deeply.
    """
    where = repr(str(path))
    if not path.is_file():
        raise DatasetError(
            f"annotation file {where} not found (or not a file); pass the path of a COCO instances JSON, "
            "e.g. annotations/instances_val2017.json"
        )
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"cannot read annotation file {where}: {type(e).__name__}: {e.strerror or e}; "
                           "check its permissions") from e
    if not data.strip():
        raise DatasetError(f"annotation file {where} is empty; regenerate or re-download it")
    encoding = json.detect_encoding(data)  # utf-8, utf-8-sig (BOM), utf-16/32 (with or without BOM)
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"annotation file {where} is not {encoding.upper()} text (byte 0x{data[e.start]:02x} at offset "
            f"{e.start}); re-save it as UTF-8"
        ) from None
    del data
    if encoding == "utf-8-sig" or (text and text[0] == codecs.BOM_UTF8.decode("utf-8")):
        text = text.lstrip("\ufeff")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"annotation file {where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; the file "
            "is probably truncated or corrupt: regenerate or re-download it"
        ) from None
    except RecursionError:
        raise DatasetError(
            f"annotation file {where}: JSON nested too deeply to be a COCO file; regenerate it"
        ) from None


def safe_file_name(name: Any) -> bool:
    """Whether ``name`` is a non-empty relative path that stays inside the folder it is joined to.

    Refused: non-strings, ``""``, absolute paths (``/x``, ``\\x``, ``C:x``), any ``..`` component (with
    ``/`` or ``\\`` as separator), NUL characters. Symbolic links are checked when the file is opened.
    """
    if type(name) is not str or not name:
        return False
    if ".." not in name and "\\" not in name and ":" not in name and name[0] != "/" and "\0" not in name:
        return True  # the common case, decided without building path objects
    if "\0" in name or name[0] in "/\\":
        return False
    win = PureWindowsPath(name)
    if win.drive or win.root or PurePosixPath(name).is_absolute():
        return False
    return ".." not in win.parts and ".." not in PurePosixPath(name).parts


# --------------------------------------------------------------------------------------------- columns
class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
_NUMBER_TYPES = {int, float}


def _column(entries: list[Any], key: str, all_dicts: bool) -> list[Any]:
    """The ``key`` values of ``entries``, :data:`_MISSING` where absent (or where the entry is not a dict)."""
    if not all_dicts:
        return [e.get(key, _MISSING) if type(e) is dict else _MISSING for e in entries]
    col = list(map(dict.get, entries, repeat(key)))  # C speed; None for absent keys ...
    if type(None) in set(map(type, col)):  # ... so tell an explicit null from an absent key where it matters
        col = [v if v is not None or key in e else _MISSING for v, e in zip(col, entries)]
    return col


def _missing(col: list[Any], types: set[type]) -> np.ndarray:
    if _Missing not in types:
        return np.zeros(len(col), bool)
    return np.fromiter((v is _MISSING for v in col), bool, len(col))


def _int_column(col: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``int64`` values, where each is an int (not bool) within int64, where it is missing."""
    n = len(col)
    types = set(map(type, col))
    if types <= {int}:
        try:
            return np.array(col, dtype=np.int64).reshape(n), np.ones(n, bool), np.zeros(n, bool)
        except OverflowError:
            pass
    ok = np.fromiter((type(v) is int and -_INT64_MAX <= v <= _INT64_MAX for v in col), bool, n)
    vals = np.fromiter((v if o else 0 for v, o in zip(col, ok.tolist())), np.int64, n)
    return vals, ok, _missing(col, types)


def _float_column(col: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``float64`` values and where each is a finite int/float (not bool)."""
    n = len(col)
    if set(map(type, col)) <= _NUMBER_TYPES:
        try:
            vals = np.fromiter(col, np.float64, n)
            return vals, np.isfinite(vals)
        except OverflowError:
            pass
    vals = np.fromiter((_to_float(v) for v in col), np.float64, n)
    return vals, np.isfinite(vals)


def _to_float(v: Any) -> float:
    if type(v) is float or type(v) is int:
        try:
            return float(v)
        except OverflowError:
            return math.nan
    return math.nan


def _size_column(col: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Positive integral sizes (ints or integral floats) as ``int64``, and where they are valid."""
    vals, ok = _float_column(col)
    ok &= (vals > 0) & (vals <= _SIZE_MAX)
    ok &= np.floor(np.where(ok, vals, 0)) == np.where(ok, vals, 0)
    return np.where(ok, vals, 0).astype(np.int64), ok


def _box_column(col: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``float64 [n, 4]`` boxes and where each is a list of 4 finite numbers."""
    n = len(col)
    if (set(map(type, col)) == {list} and set(map(len, col)) == {4}
            and set(map(type, chain.from_iterable(col))) <= _NUMBER_TYPES):
        try:
            boxes = np.fromiter(chain.from_iterable(col), np.float64, 4 * n).reshape(n, 4)
            return boxes, np.isfinite(boxes).all(axis=1)
        except OverflowError:
            pass
    boxes = np.zeros((n, 4))
    ok = np.zeros(n, bool)
    for i, b in enumerate(col):
        if type(b) is list and len(b) == 4 and all(type(v) is int or type(v) is float for v in b):
            row = [_to_float(v) for v in b]
            if all(math.isfinite(v) for v in row):
                boxes[i], ok[i] = row, True
    return boxes, ok


def _crowd_column(col: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``iscrowd`` as 0/1, where it is valid (0, 1, false, true, 0.0, 1.0 or absent), where absent."""
    n = len(col)
    types = set(map(type, col))
    if types <= {int}:
        try:
            arr = np.array(col, dtype=np.int64).reshape(n)
            ok = (arr == 0) | (arr == 1)
            return np.where(ok, arr, 0).astype(np.uint8), ok, np.zeros(n, bool)
        except OverflowError:
            pass
    absent = np.fromiter((v is _MISSING or v is None for v in col), bool, n)
    ok = absent | np.fromiter((type(v) in (int, float, bool) and v in (0, 1) for v in col), bool, n)
    vals = np.fromiter((1 if (o and not a and v == 1) else 0 for v, o, a in zip(col, ok.tolist(), absent.tolist())),
                       np.uint8, n)
    return vals, ok, absent


def _first_occurrence(values: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Among ``candidates`` (a mask), where a value already appeared at an earlier candidate."""
    idx = np.flatnonzero(candidates)
    dup = np.zeros(len(values), bool)
    if len(idx) < 2:
        return dup
    _, first = np.unique(values[idx], return_index=True)
    later = np.ones(len(idx), bool)
    later[first] = False
    dup[idx[later]] = True
    return dup


def _assign(reason: np.ndarray, mask: np.ndarray, code: int) -> None:
    reason[(reason == 0) & mask] = code


def _first(mask: np.ndarray, k: int = _MAX_EXAMPLES) -> list[int]:
    return np.flatnonzero(mask)[:k].tolist()


def _segment_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sums of consecutive segments of ``values`` with the given lengths (empty segments sum to 0)."""
    cs = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    ends = np.cumsum(lengths)
    return cs[ends] - cs[ends - lengths]


def _offsets(lengths: Iterable[int] | np.ndarray) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


# ------------------------------------------------------------------------------------------ categories
def _clean_categories(raw: dict[str, Any], where: str) -> list[dict[str, Any]]:
    cats = raw.get("categories")
    if not isinstance(cats, list) or not cats:
        what = "missing" if cats is None else ("empty" if isinstance(cats, list) else f"a {type(cats).__name__}")
        raise DatasetError(
            f"{where}: 'categories' is {what}; a COCO instances file needs a non-empty list of "
            "{'id': <int>, 'name': <str>} entries"
        )
    seen: dict[int, int] = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict):
            raise DatasetError(f"{where}: categories[{i}] is a {type(c).__name__}, not an object; make it "
                               "{'id': <int>, 'name': <str>}")
        cid = c.get("id", _MISSING)
        if type(cid) is not int or not 0 < cid <= _INT64_MAX:
            got = "missing" if cid is _MISSING else f"{cid!r}"
            raise DatasetError(f"{where}: categories[{i}].id is {got}, not a positive integer; give every "
                               "category a unique positive integer id")
        if not isinstance(c.get("name"), str) or not c["name"]:
            raise DatasetError(f"{where}: categories[{i}].name (category id {cid}) is {c.get('name')!r}; give it "
                               "a non-empty string name")
        if cid in seen:
            raise DatasetError(
                f"{where}: category id {cid} appears twice (categories[{seen[cid]}] and categories[{i}]); "
                "category ids must be unique: renumber or merge them"
            )
        seen[cid] = i
    return [dict(c) for c in cats]


# ---------------------------------------------------------------------------------------------- images
_IMAGE_KEYS = ("id", "file_name", "height", "width")
(_I_OK, _I_MISSING, _I_BAD_ID, _I_BAD_SIZE, _I_BAD_NAME, _I_DUP) = range(6)
_IMAGE_REASON_KEYS = {_I_MISSING: "image_missing_keys", _I_BAD_ID: "image_bad_id", _I_BAD_SIZE: "image_bad_size",
                      _I_BAD_NAME: "image_bad_file_name", _I_DUP: "image_duplicate_id"}


@dataclass
class _Images:
    ids: np.ndarray  # sorted
    heights: np.ndarray
    widths: np.ndarray
    names: list[str]
    skipped_ids: np.ndarray  # int ids of skipped entries that no kept image has


def _clean_images(images: list[Any], where: str, report: DatasetReport) -> _Images:
    n = len(images)
    report.images_in_file = n
    all_dicts = set(map(type, images)) <= {dict}
    ids_l, names_l = _column(images, "id", all_dicts), _column(images, "file_name", all_dicts)
    h_l, w_l = _column(images, "height", all_dicts), _column(images, "width", all_dicts)
    ids, id_ok, id_missing = _int_column(ids_l)
    heights, h_ok = _size_column(h_l)
    widths, w_ok = _size_column(w_l)
    name_ok = np.fromiter(map(safe_file_name, names_l), bool, n)
    missing = id_missing | _missing(names_l, set(map(type, names_l))) | _missing(h_l, set(map(type, h_l)))
    missing |= _missing(w_l, set(map(type, w_l)))
    if not all_dicts:
        missing |= np.fromiter((type(e) is not dict for e in images), bool, n)
    reason = np.zeros(n, np.int8)
    _assign(reason, missing, _I_MISSING)
    _assign(reason, ~(id_ok & (ids > 0)), _I_BAD_ID)
    _assign(reason, ~(h_ok & w_ok), _I_BAD_SIZE)
    _assign(reason, ~name_ok, _I_BAD_NAME)
    dup = _first_occurrence(ids, reason == 0)
    _assign(reason, dup, _I_DUP)
    keep = reason == 0

    first_of: dict[int, int] = {}
    for code, key in _IMAGE_REASON_KEYS.items():
        count = int(np.count_nonzero(reason == code))
        if not count:
            continue
        for i in _first(reason == code):
            im = images[i]
            if code == _I_MISSING:
                if not isinstance(im, dict):
                    ex = f"images[{i}] is a {type(im).__name__}"
                else:
                    ex = f"images[{i}] (id {im.get('id')!r}) lacks {[k for k in _IMAGE_KEYS if k not in im]}"
            elif code == _I_BAD_ID:
                ex = f"images[{i}] {im.get('file_name')!r} has id {im.get('id')!r}"
            elif code == _I_BAD_SIZE:
                ex = (f"images[{i}] (id {im['id']}) {im.get('file_name')!r}: height={im['height']!r} "
                      f"width={im['width']!r}")
            elif code == _I_BAD_NAME:
                ex = (f"images[{i}].file_name {im['file_name']!r} (id {im['id']}): use a path relative to the "
                      "image folder, without '..'")
            else:
                if not first_of:
                    kept_idx = np.flatnonzero(keep)
                    first_of = dict(zip(ids[kept_idx].tolist(), kept_idx.tolist()))
                ex = (f"images[{i}] id {im['id']}: {im.get('file_name')!r} (kept images[{first_of[im['id']]}] "
                      f"{images[first_of[im['id']]].get('file_name')!r})")
            report._example(key, ex)
        report.skipped[key] = report.skipped.get(key, 0) + count

    kept = np.flatnonzero(keep)
    order = kept[np.argsort(ids[kept], kind="stable")]
    skipped = ids[id_ok & ~keep]
    # an id written as a string ("391895") still names the image its annotations point at
    digits = [int(ids_l[i]) for i in np.flatnonzero(~id_ok & ~keep).tolist()
              if type(ids_l[i]) is str and ids_l[i].isascii() and ids_l[i].isdigit() and len(ids_l[i]) < 19]
    skipped = np.setdiff1d(np.concatenate([skipped, np.array(digits, dtype=np.int64)]), ids[kept])
    return _Images(ids=ids[order], heights=heights[order].astype(np.int32), widths=widths[order].astype(np.int32),
                   names=[names_l[i] for i in order.tolist()], skipped_ids=skipped)


# ----------------------------------------------------------------------------------------- annotations
(_A_OK, _A_MISSING, _A_BAD_ID, _A_DUP, _A_ON_SKIPPED, _A_UNKNOWN_IMAGE, _A_UNKNOWN_CAT, _A_BAD_BOX, _A_BAD_CROWD,
 _A_DEGENERATE, _A_OUTSIDE, _A_EMPTY_INSIDE, _A_BAD_SEGM) = range(13)
_ANN_REASON_KEYS = {
    _A_MISSING: "annotation_missing_keys", _A_BAD_ID: "annotation_bad_id", _A_DUP: "annotation_duplicate_id",
    _A_ON_SKIPPED: "annotation_on_skipped_image", _A_UNKNOWN_IMAGE: "annotation_unknown_image",
    _A_UNKNOWN_CAT: "annotation_unknown_category", _A_BAD_BOX: "annotation_invalid_field",
    _A_BAD_CROWD: "annotation_invalid_field", _A_DEGENERATE: "box_degenerate", _A_OUTSIDE: "box_outside_image",
    _A_EMPTY_INSIDE: "box_degenerate", _A_BAD_SEGM: "annotation_invalid_segmentation",
}
_ANN_KEYS = ("id", "image_id", "category_id", "bbox")


def _where(i: int, ids: list[Any], image_ids: list[Any]) -> str:
    return f"annotations[{i}] (id {ids[i]!r}, image {image_ids[i]!r})"


def _compressed_counts(s: bytes) -> np.ndarray | None:
    """Decodes COCO's compressed RLE counts (pycocotools' ``rleFrString``), or None if malformed."""
    a = np.frombuffer(s, np.uint8).astype(np.int64) - 48
    if a.size == 0 or bool(np.any((a < 0) | (a > 63))):
        return None
    more = (a & 0x20) != 0
    if more[-1]:
        return None
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    nchar = ends - starts + 1
    if int(nchar.max()) > 12:  # more than 60 bits: not a pixel count
        return None
    k = np.arange(a.size) - np.repeat(starts, nchar)
    vals = np.add.reduceat((a & 0x1F) << (5 * k), starts)
    neg = (a[ends] & 0x10) != 0
    vals = np.where(neg, vals | (np.int64(-1) << (5 * nchar)), vals)
    counts = vals.copy()
    counts[1::2] = np.cumsum(vals[1::2])  # counts[m] = x[m] + counts[m - 2] for m > 2
    counts[2::2] = np.cumsum(vals[2::2])
    return counts


def _clean_rle(segm: dict[str, Any], h: int, w: int) -> tuple[bytes | None, str | None]:
    """``(compressed counts, None)`` for a valid RLE of an ``h x w`` image, else ``(None, problem)``."""
    size, counts = segm.get("size"), segm.get("counts")
    if type(size) is not list or len(size) != 2 or size != [h, w]:
        return None, f"RLE size {size!r} differs from the image size [{h}, {w}]"
    if h * w >= 2**32:
        return None, f"an RLE cannot describe a {w}x{h} image (over 2^32 pixels)"
    if type(counts) is list:
        arr = None
        if set(map(type, counts)) <= {int}:
            try:
                arr = np.array(counts, dtype=np.int64)
            except OverflowError:
                arr = None
        if arr is None or bool(np.any(arr < 0)) or int(arr.sum()) != h * w:
            return None, "uncompressed RLE counts are not non-negative ints summing to height*width"
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"], None
    if type(counts) is not str:
        return None, f"RLE counts is a {type(counts).__name__}"
    try:
        raw = counts.encode("ascii")
    except UnicodeEncodeError:
        return None, "compressed RLE counts contain non-ASCII characters"
    decoded = _compressed_counts(raw)
    if decoded is None or bool(np.any(decoded < 0)) or int(decoded.sum()) != h * w:
        return None, "compressed RLE counts are malformed or do not sum to height*width"
    return raw, None


def _polygon_area(polys: list[np.ndarray], h: int, w: int) -> float:
    return float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in polys], h, w))))


def _clean_annotations(anns: list[Any], img: _Images, cat_ids: np.ndarray, need_segmentation: bool,
                       report: DatasetReport) -> dict[str, np.ndarray]:
    """Validates ``anns`` (emptied on the way, to free memory early) into the annotation arrays."""
    n = len(anns)
    report.annotations_in_file = n
    all_dicts = set(map(type, anns)) <= {dict}
    not_dict = None if all_dicts else np.fromiter((type(a) is not dict for a in anns), bool, n)
    aid_l, iid_l, cid_l = _column(anns, "id", all_dicts), _column(anns, "image_id", all_dicts), \
        _column(anns, "category_id", all_dicts)
    box_l, crowd_l = _column(anns, "bbox", all_dicts), _column(anns, "iscrowd", all_dicts)
    area_l, segm_l = _column(anns, "area", all_dicts), _column(anns, "segmentation", all_dicts)
    kinds_of_entries = [type(a).__name__ for a in anns] if not all_dicts else None
    anns.clear()  # the dicts go now; their values live on in the columns until they are copied out

    # ---- the rules, in order: the first one an annotation fails is its reason
    aid, aid_ok, aid_missing = _int_column(aid_l)
    iid, iid_ok, iid_missing = _int_column(iid_l)
    cid, cid_ok, cid_missing = _int_column(cid_l)
    reason = np.zeros(n, np.int8)
    if not_dict is not None:
        _assign(reason, not_dict, _A_MISSING)
    _assign(reason, aid_missing | iid_missing | cid_missing | _missing(box_l, set(map(type, box_l))), _A_MISSING)
    _assign(reason, ~(aid_ok & (aid > 0)), _A_BAD_ID)
    _assign(reason, _first_occurrence(aid, reason == 0), _A_DUP)
    nimg = len(img.ids)
    pos = np.minimum(np.searchsorted(img.ids, iid), max(nimg - 1, 0))
    in_images = (iid_ok & (img.ids[pos] == iid)) if nimg else np.zeros(n, bool)
    _assign(reason, ~in_images & iid_ok & np.isin(iid, img.skipped_ids), _A_ON_SKIPPED)
    _assign(reason, ~in_images, _A_UNKNOWN_IMAGE)
    _assign(reason, ~(cid_ok & np.isin(cid, cat_ids)), _A_UNKNOWN_CAT)
    box, box_ok = _box_column(box_l)
    _assign(reason, ~box_ok, _A_BAD_BOX)
    crowd, crowd_ok, crowd_absent = _crowd_column(crowd_l)
    _assign(reason, ~crowd_ok, _A_BAD_CROWD)
    h = img.heights[pos].astype(np.float64) if nimg else np.zeros(n)
    w = img.widths[pos].astype(np.float64) if nimg else np.zeros(n)
    x, y, bw, bh = box.T
    _assign(reason, (bw <= 0) | (bh <= 0), _A_DEGENERATE)
    tol = BOX_CLIP_TOLERANCE
    _assign(reason, (x < -tol) | (y < -tol) | (x + bw > w + tol) | (y + bh > h + tol), _A_OUTSIDE)
    partial = (x < 0) | (y < 0) | (x + bw > w) | (y + bh > h)
    x0, y0 = np.maximum(x, 0.0), np.maximum(y, 0.0)
    x1, y1 = np.minimum(x + bw, w), np.minimum(y + bh, h)
    _assign(reason, partial & ((x1 - x0 <= 0) | (y1 - y0 <= 0)), _A_EMPTY_INSIDE)
    clipped_box = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
    del x, y, bw, bh, x0, y0, x1, y1

    # ---- segmentations of the annotations still valid, read in file order (memory order: several times
    # faster than jumping around the parsed JSON)
    cand = np.flatnonzero(reason == 0)
    seg_types = set(map(type, segm_l))
    is_list = np.ones(n, bool) if seg_types == {list} else np.fromiter((type(v) is list for v in segm_l), bool, n)
    poly_idx = cand[is_list[cand]]
    seg_lists = segm_l if len(poly_idx) == n else [segm_l[i] for i in poly_idx.tolist()]
    npoly = np.fromiter(map(len, seg_lists), np.int64, len(seg_lists))
    polys = list(chain.from_iterable(seg_lists))
    del seg_lists
    poly_ann = np.repeat(poly_idx, npoly)
    poly_j = np.arange(len(polys)) - np.repeat(np.cumsum(npoly) - npoly, npoly)  # number within its annotation
    if set(map(type, polys)) <= {list}:
        ptype_ok = np.ones(len(polys), bool)
        plen = np.fromiter(map(len, polys), np.int64, len(polys))
    else:
        ptype_ok = np.fromiter((type(p) is list for p in polys), bool, len(polys))
        plen = np.fromiter((len(p) if type(p) is list else 0 for p in polys), np.int64, len(polys))
    lists = polys if bool(ptype_ok.all()) else [p for p, ok in zip(polys, ptype_ok.tolist()) if ok]
    coords, num_ok = _coordinates(lists, plen[ptype_ok])
    del lists
    pnum_ok = np.zeros(len(polys), bool)
    pnum_ok[ptype_ok] = num_ok
    finite = ptype_ok.copy()
    nonfinite = ~np.isfinite(coords)
    if nonfinite.any():
        finite[ptype_ok] = _segment_sums(nonfinite, plen[ptype_ok]) == 0
    del nonfinite
    poly_ok = ptype_ok & pnum_ok & finite & (plen >= 6) & (plen % 2 == 0)
    bad_polys = np.flatnonzero(~poly_ok)
    if len(bad_polys):
        first = bad_polys[np.lexsort((poly_j[bad_polys], poly_ann[bad_polys]))[:_MAX_EXAMPLES]]  # file order
        for q in first.tolist():
            a, j = int(poly_ann[q]), int(poly_j[q])
            if not ptype_ok[q]:
                what = f"a {type(polys[q]).__name__}, not a list of coordinates"
            elif not (pnum_ok[q] and finite[q]):
                what = "coordinates that are not all finite numbers"
            else:
                what = f"{int(plen[q])} coordinates (need an even number >= 6)"
            report._example("polygon_invalid", f"{_where(a, aid_l, iid_l)} polygon {j}: {what}")
        report.skipped["polygon_invalid"] = report.skipped.get("polygon_invalid", 0) + len(bad_polys)
    del polys
    good_polys = np.bincount(poly_ann[poly_ok], minlength=n)

    segm_problem: dict[int, str] = {}
    rle_of: dict[int, bytes] = {}
    others = cand[~is_list[cand]] if seg_types != {list} else np.zeros(0, np.int64)
    for i in others.tolist():
        v = segm_l[i]
        if type(v) is dict:
            rle, problem = _clean_rle(v, int(h[i]), int(w[i]))
            if rle is not None:
                rle_of[i] = rle
            else:
                segm_problem[i] = problem or "invalid RLE"
        elif v is None or v is _MISSING:
            segm_problem[i] = "no segmentation"
        else:
            segm_problem[i] = f"segmentation is a {type(v).__name__}"
    for i in poly_idx[good_polys[poly_idx] == 0].tolist():
        segm_problem[i] = "no valid polygon" if segm_l[i] else "no segmentation"
    problems = sorted(segm_problem)
    if need_segmentation:
        bad = np.zeros(n, bool)
        bad[problems] = True
        _assign(reason, bad, _A_BAD_SEGM)
    else:
        removed = [i for i in problems if segm_l[i] is not None and segm_l[i] is not _MISSING and segm_l[i] != []]
        for i in removed[:_MAX_EXAMPLES]:
            report._example("segmentation_removed", f"{_where(i, aid_l, iid_l)}: {segm_problem[i]}")
        if removed:
            report.fixed["segmentation_removed"] = report.fixed.get("segmentation_removed", 0) + len(removed)
    keep = reason == 0

    # ---- the report: skips in rule order, then repairs
    for code, key in _ANN_REASON_KEYS.items():
        mask = reason == code
        count = int(np.count_nonzero(mask))
        if not count:
            continue
        for i in _first(mask):
            where = _where(i, aid_l, iid_l)
            if code == _A_MISSING:
                if kinds_of_entries is not None and kinds_of_entries[i] != "dict":
                    ex = f"annotations[{i}] is a {kinds_of_entries[i]}"
                else:
                    lacks = [k for k, col in zip(_ANN_KEYS, (aid_l, iid_l, cid_l, box_l)) if col[i] is _MISSING]
                    ex = f"annotations[{i}] (id {aid_l[i]!r}) lacks {lacks}"
            elif code == _A_BAD_ID:
                ex = f"annotations[{i}] (image {iid_l[i]!r}) has id {aid_l[i]!r}"
            elif code in (_A_ON_SKIPPED, _A_UNKNOWN_IMAGE):
                ex = f"{where}: image_id {iid_l[i]!r}"
            elif code == _A_UNKNOWN_CAT:
                ex = f"{where}: category_id {cid_l[i]!r}"
            elif code == _A_BAD_BOX:
                ex = f"{where}: bbox {box_l[i]!r} is not 4 finite numbers [x, y, width, height]"
            elif code == _A_BAD_CROWD:
                ex = f"{where}: iscrowd {crowd_l[i]!r} is not 0 or 1"
            elif code == _A_DEGENERATE:
                ex = f"{where}: bbox {box_l[i]!r}"
            elif code == _A_OUTSIDE:
                ex = f"{where}: bbox (xywh) {box_l[i]!r} in a {int(w[i])}x{int(h[i])} image"
            elif code == _A_EMPTY_INSIDE:
                ex = f"{where}: bbox {box_l[i]!r} is empty inside the image"
            else:
                ex = f"{where}: {segm_problem.get(i, 'no segmentation')}"
            report._example(key, ex)
        report.skipped[key] = report.skipped.get(key, 0) + count
    clipped = keep & partial
    for i in _first(clipped):
        report._example("box_clipped", f"{_where(i, aid_l, iid_l)}: {box_l[i]!r} -> {clipped_box[i].tolist()!r}")
    if clipped.any():
        report.fixed["box_clipped"] = report.fixed.get("box_clipped", 0) + int(np.count_nonzero(clipped))
        box[clipped] = clipped_box[clipped]
    filled = keep & crowd_absent
    for i in _first(filled):
        report._example("iscrowd_filled", _where(i, aid_l, iid_l))
    if filled.any():
        report.fixed["iscrowd_filled"] = report.fixed.get("iscrowd_filled", 0) + int(np.count_nonzero(filled))

    # ---- missing areas: the cleaned segmentation's, else the box's
    area, area_ok = _float_column(area_l)
    no_area = np.flatnonzero(keep & ~area_ok)
    if len(no_area):
        coord_off = np.zeros(len(plen), np.int64)
        coord_off[ptype_ok] = np.cumsum(plen[ptype_ok]) - plen[ptype_ok]
        first_poly, npoly_of = np.zeros(n, np.int64), np.zeros(n, np.int64)
        first_poly[poly_idx], npoly_of[poly_idx] = np.cumsum(npoly) - npoly, npoly
        for k, i in enumerate(no_area.tolist()):
            hh, ww = int(h[i]), int(w[i])
            if i in rle_of:
                area[i] = float(mask_utils.area({"size": [hh, ww], "counts": rle_of[i]}))
            elif good_polys[i]:
                qs = [q for q in range(first_poly[i], first_poly[i] + npoly_of[i]) if poly_ok[q]]
                area[i] = _polygon_area([coords[coord_off[q] : coord_off[q] + plen[q]] for q in qs], hh, ww)
            else:
                area[i] = float(box[i, 2] * box[i, 3])
            if k < _MAX_EXAMPLES:
                report._example("area_filled", f"{_where(i, aid_l, iid_l)}: area {area[i]:.1f}")
        report.fixed["area_filled"] = report.fixed.get("area_filled", 0) + len(no_area)

    # everything Python-side has been read: drop the columns (and with them the parsed JSON values)
    del aid_l, iid_l, cid_l, box_l, crowd_l, area_l, segm_l, kinds_of_entries

    # ---- the arrays: annotations grouped by image, polygons kept in file order
    keep_idx = np.flatnonzero(keep)
    order = keep_idx[np.argsort(pos[keep_idx], kind="stable")]
    img_of = pos[order]
    poly_keep = poly_ok & keep[poly_ann]
    if not poly_keep.all():
        coords = coords[np.repeat(poly_keep[ptype_ok], plen[ptype_ok])]
    kept_polys = np.bincount(poly_ann[poly_keep], minlength=n)
    first_kept = np.cumsum(kept_polys) - kept_polys
    rle_list = [rle_of.get(i, b"") for i in order.tolist()] if rle_of else []
    return {
        "ann_start": _offsets(np.bincount(img_of, minlength=nimg)),
        "ann_id": aid[order], "category_id": cid[order], "bbox": np.ascontiguousarray(box[order]),
        "area": area[order], "iscrowd": crowd[order],
        "poly_first": first_kept[order], "poly_count": kept_polys[order].astype(np.int32),
        "coord_start": _offsets(plen[poly_keep]), "coords": coords,
        "rle_start": _offsets([len(r) for r in rle_list]) if rle_of else np.zeros(len(order) + 1, np.int64),
        "rle_bytes": np.frombuffer(b"".join(rle_list), np.uint8).copy(),
    }


def _coordinates(lists: list[list[Any]], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The coordinates of ``lists`` (polygons) as one ``float64`` array, and which polygons are all numbers.

    Non-numeric polygons get NaN coordinates (of their own length), so offsets stay those of ``lengths``.
    """
    total = int(lengths.sum())
    if set(map(type, chain.from_iterable(lists))) <= _NUMBER_TYPES:
        try:
            return np.fromiter(chain.from_iterable(lists), np.float64, total), np.ones(len(lists), bool)
        except OverflowError:
            pass
    ok = np.fromiter((all(type(v) is float or type(v) is int for v in p) for p in lists), bool, len(lists))

    def values() -> Iterator[float]:
        for p, good in zip(lists, ok.tolist()):
            if good:
                yield from (_to_float(v) for v in p)
            else:
                yield from (math.nan for _ in p)

    return np.fromiter(values(), np.float64, total), ok


# ----------------------------------------------------------------------------------------------- build
def _release_freed_memory() -> None:
    """Hands the heap freed by the parsed JSON back to the OS (glibc keeps it otherwise); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def build_index(ann_file: str | os.PathLike[str], *, need_segmentation: bool) -> CocoIndex:
    """Reads and validates a COCO instances file (see the module docstring).

    Args:
        ann_file: The JSON file.
        need_segmentation: Annotations without a valid segmentation are skipped (masks or semantic
            targets are built from them); otherwise their invalid segmentation is dropped.

    Returns:
        The index, with its report (``num_images``/``num_annotations``/``num_crowd`` counted over the whole
        cleaned index; the dataset recounts what it keeps).

    Raises:
        DatasetError: On the fatal problems of the module docstring.
    """
    path = Path(ann_file)
    where = str(path)
    start = time.perf_counter()
    report = DatasetReport(ann_file=where)
    gc_enabled = gc.isenabled()
    gc.disable()  # millions of new containers: see the module docstring
    try:
        raw = read_json_file(path)
        if not isinstance(raw, dict):
            raise DatasetError(
                f"annotation file {where!r}: top level is a {type(raw).__name__}, expected a JSON object with "
                "'images', 'annotations' and 'categories' (COCO instances format)"
            )
        categories = _clean_categories(raw, where)
        images = raw.get("images")
        if not isinstance(images, list) or not images:
            what = "missing" if images is None else ("empty" if isinstance(images, list) else
                                                     f"a {type(images).__name__}, not a list")
            raise DatasetError(
                f"{where}: 'images' is {what}; a COCO file needs a non-empty list of "
                "{'id', 'file_name', 'height', 'width'} entries"
            )
        anns = raw.get("annotations", [])
        if not isinstance(anns, list):
            raise DatasetError(f"{where}: 'annotations' is a {type(anns).__name__}, expected a list of "
                               "{'id', 'image_id', 'category_id', 'bbox', ...} entries (or leave it out)")
        info, licenses = raw.get("info", {}), raw.get("licenses", [])
        raw.clear()
        del raw
        img = _clean_images(images, where, report)
        del images
        cat_ids = np.array(sorted(c["id"] for c in categories), dtype=np.int64)
        arrays = _clean_annotations(anns, img, cat_ids, need_segmentation, report)
        del anns
        names = [s.encode("utf-8", "surrogatepass") for s in img.names]
        arrays.update({
            "image_id": img.ids, "height": img.heights, "width": img.widths,
            "file_name_start": _offsets([len(b) for b in names]),
            "file_name_bytes": np.frombuffer(b"".join(names), np.uint8).copy(),
        })
    finally:
        if gc_enabled:
            gc.enable()
    _release_freed_memory()
    report.num_categories = len(categories)
    report.num_images = len(img.ids)
    report.num_annotations = len(arrays["ann_id"])
    report.num_crowd = int(np.count_nonzero(arrays["iscrowd"]))
    index = CocoIndex(arrays={k: arrays[k] for k in INDEX_ARRAYS}, categories=categories, info=info,
                      licenses=licenses, report=report)
    logger.debug("indexed %s in %.2f s", where, time.perf_counter() - start)
    return index

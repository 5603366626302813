"""The bad-dataset corpus: broken COCO files and images made from tests/data/tiny_coco, one table, one test per row.

Every row states its class and the test holds the dataset to it:

- **fatal**: :class:`~resnet_det.data.CocoDetection` raises :class:`~resnet_det.data.DatasetError` with one line that
  names the file, the field and the fix (and ``resnet-det train`` exits 2 with that line and no traceback:
  :func:`test_train_tool_refuses_a_fatal_file_in_one_line`);
- **skipped**: the bad entries are left out and the rest loads. Problems in the annotation file are counted in
  the dataset's report (the exact counts are checked) and logged in its one summary line; unusable image files
  are found when the item is loaded: a warning names the file, the item is counted in ``num_unreadable`` and
  the next item is returned (training goes on: :func:`test_train_tool_trains_past_skipped_entries`);
- **accepted**: the input loads correctly (what arrives is checked).

Files escaping the image folder and decompression bombs are never opened or decoded (spies on the loaders).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import resnet_det.data.coco as coco_module
from resnet_det.cli import main
from resnet_det.data import CocoDetection, DatasetError
from resnet_det.data.images import load_image

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny_coco" / "overfit_R_18_FPN.yaml")
CROWD_IMAGE = 184613

Make = Callable[[Path, dict[str, Any]], tuple[Path, Path]]


@dataclass(frozen=True)
class Case:
    """One row. ``make(tmp, ctx)`` writes the dataset and returns ``(image_root, ann_file)``; ``expect`` are
    fragments of the error (fatal) or of the report / warnings (skipped); ``counts(ctx)`` the exact report
    counts (skips and repairs); ``check(ds, ctx)`` what an accepted (or skipped) input must give."""

    name: str
    klass: str
    make: Make
    expect: tuple[str, ...] = ()
    counts: Callable[[dict[str, Any]], dict[str, int]] | None = None
    check: Callable[[CocoDetection, dict[str, Any]], None] | None = None
    masks: bool = False
    training: bool = True
    load_items: bool = False  # image files: load every item, expect one unreadable


# ------------------------------------------------------------------------------------------------ builders
def _write(tmp: Path, content: bytes | str) -> Path:
    path = tmp / "ann.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def raw(content: Callable[[dict[str, Any]], bytes | str]) -> Make:
    """A file of these bytes, next to the real images."""

    def make(tmp: Path, ctx: dict[str, Any]) -> tuple[Path, Path]:
        return ctx["images"], _write(tmp, content(ctx))

    return make


def edit(change: Callable[[dict[str, Any], dict[str, Any]], Any]) -> Make:
    """tiny COCO's annotations, changed in place by ``change(data, ctx)``."""

    def make(tmp: Path, ctx: dict[str, Any]) -> tuple[Path, Path]:
        data = copy.deepcopy(ctx["gt"])
        change(data, ctx)
        return ctx["images"], _write(tmp, json.dumps(data))

    return make


def ann(key: str, value: Any, k: int = 0) -> Make:
    """Annotation ``k`` (id 30093 on image 554625 for k=0) with ``key`` set to ``value`` (deleted if _DEL)."""

    def change(d: dict[str, Any], ctx: dict[str, Any]) -> None:
        a = d["annotations"][k]
        if value is _DEL:
            del a[key]
        else:
            a[key] = value

    return edit(change)


def img(key: str, value: Any) -> Make:
    """Image 0 (``000000391895.jpg``) with ``key`` set to ``value`` (deleted if _DEL)."""

    def change(d: dict[str, Any], ctx: dict[str, Any]) -> None:
        if value is _DEL:
            del d["images"][0][key]
        else:
            d["images"][0][key] = value

    return edit(change)


def crowd_segm(value: Callable[[dict[str, Any]], Any]) -> Make:
    """The crowd annotation's segmentation replaced by ``value(old)``."""

    def change(d: dict[str, Any], ctx: dict[str, Any]) -> None:
        a = next(a for a in d["annotations"] if a["iscrowd"])
        a["segmentation"] = value(a["segmentation"])

    return edit(change)


_DEL = object()


def two_images(write_bad: Callable[[Path, dict[str, Any]], dict[str, Any]]) -> Make:
    """A two-image dataset: a real tiny-COCO image with its annotations, and image id 7 that
    ``write_bad(image_root, ctx)`` writes (returning its ``file_name``/``height``/``width``) with one box."""

    def make(tmp: Path, ctx: dict[str, Any]) -> tuple[Path, Path]:
        root = tmp / "images"
        root.mkdir()
        good = ctx["gt"]["images"][0]
        shutil.copy(ctx["images"] / good["file_name"], root / good["file_name"])
        bad = {"id": 7, **write_bad(root, ctx)}
        anns = [a for a in ctx["gt"]["annotations"] if a["image_id"] == good["id"]]
        anns.append({"id": 99, "image_id": 7, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0,
                     "iscrowd": 0, "segmentation": [[1.0, 1.0, 6.0, 1.0, 6.0, 6.0, 1.0, 6.0]]})
        data = {"images": [good, bad], "annotations": anns, "categories": ctx["gt"]["categories"]}
        return root, _write(tmp, json.dumps(data))

    return make


def _png_bomb(path: Path, width: int = 20000, height: int = 15000) -> None:
    """A complete, valid 8-bit grayscale PNG of width x height zeros (300 megapixels, ~300 KB on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(1)
    rows = b"\0" * ((width + 1) * 100)  # filter byte + pixels, 100 rows at a time
    idat = b"".join(z.compress(rows) for _ in range(height // 100)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _bomb(root: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    shutil.copy(ctx["bomb"], root / "bomb.png")
    return {"file_name": "bomb.png", "height": 15000, "width": 20000}


def _png16(root: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    arr = (np.arange(32 * 48, dtype=np.uint32).reshape(32, 48) * 40).astype(np.uint16)
    Image.fromarray(arr).save(root / "gray16.png")
    ctx["expected"] = np.clip(np.rint(arr / 257.0), 0, 255)
    return {"file_name": "gray16.png", "height": 32, "width": 48}


def _palette(root: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    im = Image.new("P", (48, 32))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    im.paste(1, (0, 0, 24, 32))
    im.paste(2, (24, 0, 48, 32))
    im.save(root / "palette.png")
    expected = np.zeros((32, 48, 3))
    expected[:, :24, 0], expected[:, 24:, 1] = 255, 255
    ctx["expected"] = expected
    return {"file_name": "palette.png", "height": 32, "width": 48}


def _jpeg(root: Path, name: str, size: tuple[int, int] = (32, 48)) -> Path:
    path = root / name
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _truncated(root: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    path = _jpeg(root, "truncated.jpg")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return {"file_name": "truncated.jpg", "height": 32, "width": 48}


def _missing_file(root: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    return {"file_name": "not_there.jpg", "height": 32, "width": 48}


def _wrong_size(root: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    _jpeg(root, "small.jpg", (32, 48))
    return {"file_name": "small.jpg", "height": 480, "width": 640}


def _symlink_out(root: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    outside = root.parent / "outside"
    outside.mkdir()
    target = _jpeg(outside, "secret.jpg")  # a readable image: only the rule keeps it out
    (root / "evil.jpg").symlink_to(target)
    return {"file_name": "evil.jpg", "height": 32, "width": 48}


def _directory(root: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    (root / "folder.jpg").mkdir()
    return {"file_name": "folder.jpg", "height": 32, "width": 48}


def _not_an_image(root: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    (root / "text.jpg").write_text("this is not an image\n")
    return {"file_name": "text.jpg", "height": 32, "width": 48}


def _pixels_of_image_7(ds: CocoDetection, ctx: dict[str, Any]) -> None:
    image, target = ds[ds.ids.index(7)]
    assert target["image_id"] == 7 and ds.num_unreadable == 0
    expected = ctx["expected"][..., None] if ctx["expected"].ndim == 2 else ctx["expected"]
    # measured: 0 on both PNGs (x / 255 * 255 in float32 is within 1.5e-5 of x)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255, np.broadcast_to(expected, (32, 48, 3)),
                               atol=1e-4)


def _same_as_original(ds: CocoDetection, ctx: dict[str, Any]) -> None:
    ref = ctx["reference"]
    assert ds.ids == ref.ids and ds.report.num_annotations == ref.report.num_annotations
    for i in (0, len(ds) - 1):
        (a, ta), (b, tb) = ds[i], ref[i]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])


def _n0(ctx: dict[str, Any]) -> int:
    """Annotations of image 0."""
    return sum(a["image_id"] == ctx["gt"]["images"][0]["id"] for a in ctx["gt"]["annotations"])


def _first_box(ds: CocoDetection, ctx: dict[str, Any]) -> list[float]:
    a = next(a for a in ds.coco.dataset["annotations"] if a["id"] == ctx["gt"]["annotations"][0]["id"])
    return a["bbox"]


def _bom(ctx: dict[str, Any]) -> bytes:
    return b"\xef\xbb\xbf" + ctx["text"].encode("utf-8")


def _latin1(ctx: dict[str, Any]) -> bytes:
    data = copy.deepcopy(ctx["gt"])
    data["categories"][0]["name"] = "caf\u00e9"
    return json.dumps(data, ensure_ascii=False).encode("latin-1")


def _no_annotations(d: dict[str, Any], ctx: dict[str, Any]) -> None:
    d["annotations"] = []


def _append(key: str, entry: Any) -> Make:
    return edit(lambda d, ctx: d[key].append(copy.deepcopy(entry) if not callable(entry) else entry(d)))


def _set(key: str, value: Any) -> Make:
    return edit(lambda d, ctx: d.__setitem__(key, value))


def _category(i: int, key: str, value: Any) -> Make:
    def change(d: dict[str, Any], ctx: dict[str, Any]) -> None:
        if value is _DEL:
            del d["categories"][i][key]
        else:
            d["categories"][i][key] = value

    return edit(change)


def _check_empty_targets(ds: CocoDetection, ctx: dict[str, Any]) -> None:
    assert len(ds) == 16
    _, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def _check_duplicate_image(ds: CocoDetection, ctx: dict[str, Any]) -> None:
    assert "dup.jpg" not in [ds.image_info(i)["file_name"] for i in range(len(ds))]  # the first one is kept


def _check_box_kept(ds: CocoDetection, ctx: dict[str, Any]) -> None:
    assert _first_box(ds, ctx) == ctx["gt"]["annotations"][0]["bbox"] and ds.report.num_annotations == 197


def _check_clipped(ds: CocoDetection, ctx: dict[str, Any]) -> None:
    assert _first_box(ds, ctx)[0] == 0.0


def _check_filled(ds: CocoDetection, ctx: dict[str, Any]) -> None:
    a = next(a for a in ds.coco.dataset["annotations"] if a["id"] == ctx["gt"]["annotations"][0]["id"])
    # measured: 0.17% (13.5 px^2: the rasterised polygon's area vs the file's area)
    assert a["iscrowd"] == 0 and a["area"] == pytest.approx(ctx["gt"]["annotations"][0]["area"], rel=0.02)


def _check_crowd_kept(ds: CocoDetection, ctx: dict[str, Any]) -> None:
    assert ds.report.num_crowd == 1
    _, target = ds[ds.ids.index(CROWD_IMAGE)]  # the crowd image still loads, crowd excluded from targets
    assert len(target["boxes"]) > 0


def _check_crowd_image_loads(ds: CocoDetection, ctx: dict[str, Any]) -> None:
    _, target = ds[ds.ids.index(CROWD_IMAGE)]
    assert target["masks"].shape[0] == len(target["boxes"]) > 0


def _check_partial_polygon(ds: CocoDetection, ctx: dict[str, Any]) -> None:
    a = next(a for a in ds.coco.dataset["annotations"] if a["id"] == ctx["gt"]["annotations"][0]["id"])
    assert a["segmentation"] == ctx["gt"]["annotations"][0]["segmentation"]  # the valid polygon survives


VALID_POLY = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]

TABLE: list[Case] = [
    # ---------------------------------------------------------------------------------- the file itself
    Case("not JSON (truncated)", "fatal", raw(lambda c: c["text"][:-100]), ("is not valid JSON", "truncated")),
    Case("empty file", "fatal", raw(lambda c: b""), ("is empty", "regenerate")),
    Case("top level is a list", "fatal", raw(lambda c: "[1, 2]"), ("top level is a list", "expected a JSON object")),
    Case("Latin-1 bytes", "fatal", raw(_latin1), ("is not UTF-8 text", "byte 0xe9", "re-save it as UTF-8")),
    Case("JSON nested 100000 deep", "fatal", raw(lambda c: "[" * 100000 + "]" * 100000), ("nested too deeply",)),
    Case("UTF-8 byte-order mark", "accepted", raw(_bom), check=_same_as_original),
    Case("UTF-16 with byte-order mark", "accepted", raw(lambda c: c["text"].encode("utf-16")),
         check=_same_as_original),
    # ------------------------------------------------------------------------------- top-level sections
    Case("images is an object", "fatal", _set("images", {"id": 1}), ("'images' is a dict, not a list",)),
    Case("images is empty (empty dataset)", "fatal", _set("images", []), ("'images' is empty",)),
    Case("no categories", "fatal", edit(lambda d, c: d.pop("categories")), ("'categories' is missing",)),
    Case("categories is a string", "fatal", _set("categories", "person"), ("'categories' is a str",)),
    Case("annotations is an object", "fatal", _set("annotations", {"id": 1}), ("'annotations' is a dict",)),
    Case("no annotations (training)", "fatal", edit(_no_annotations), ("no usable image left", "keep_empty")),
    Case("no annotations (evaluation)", "accepted", edit(_no_annotations), training=False,
         check=_check_empty_targets),
    Case("info a list, no licenses, unknown keys", "accepted",
         edit(lambda d, c: d.update(info=[1, 2], extra={"x": 1}) or d.pop("licenses")), check=_same_as_original),
    # -------------------------------------------------------------------------------------- categories
    Case("category is a string", "fatal", edit(lambda d, c: d["categories"].__setitem__(0, "person")),
         ("categories[0] is a str", "{'id': <int>, 'name': <str>}")),
    Case("category without id", "fatal", _category(0, "id", _DEL), ("categories[0].id is missing",
                                                                     "positive integer id")),
    Case("category id a string", "fatal", _category(3, "id", "4"), ("categories[3].id is '4'",)),
    Case("category id 2**70", "fatal", _category(3, "id", 2**70), ("categories[3].id is 1180591620717411303424",)),
    Case("category name a number", "fatal", _category(0, "name", 5), ("categories[0].name", "non-empty string")),
    Case("duplicate category id", "fatal", _category(1, "id", 1), ("category id 1 appears twice", "unique")),
    # ------------------------------------------------------------------------------------------ images
    Case("image id a numeric string", "skipped", img("id", "391895"), ("has id '391895'",),
         lambda c: {"image_bad_id": 1, "annotation_on_skipped_image": _n0(c)}),
    Case("image id a word", "skipped", img("id", "abc"), ("has id 'abc'",),
         lambda c: {"image_bad_id": 1, "annotation_unknown_image": _n0(c)}),
    Case("image id 2**70", "skipped", img("id", 2**70), ("has id 1180591620717411303424",),
         lambda c: {"image_bad_id": 1, "annotation_unknown_image": _n0(c)}),
    Case("duplicate image id", "skipped",
         _append("images", lambda d: {**d["images"][1], "file_name": "dup.jpg"}), ("'dup.jpg'",),
         lambda c: {"image_duplicate_id": 1}, check=_check_duplicate_image),
    Case("0-height image", "skipped", img("height", 0), ("height=0",),
         lambda c: {"image_bad_size": 1, "annotation_on_skipped_image": _n0(c)}),
    Case("height a string", "skipped", img("height", "360"), ("height='360'",),
         lambda c: {"image_bad_size": 1, "annotation_on_skipped_image": _n0(c)}),
    Case("image entry a list", "skipped", _append("images", [1, 2]), ("images[16] is a list",),
         lambda c: {"image_missing_keys": 1}),
    Case("image without file_name", "skipped", img("file_name", _DEL), ("lacks ['file_name']",),
         lambda c: {"image_missing_keys": 1, "annotation_on_skipped_image": _n0(c)}),
    Case("file_name ../../../../etc/passwd", "skipped", img("file_name", "../../../../etc/passwd"),
         ("'../../../../etc/passwd'", "relative to the image folder"),
         lambda c: {"image_bad_file_name": 1, "annotation_on_skipped_image": _n0(c)}),
    Case("file_name /etc/passwd (absolute)", "skipped", img("file_name", "/etc/passwd"), ("'/etc/passwd'",),
         lambda c: {"image_bad_file_name": 1, "annotation_on_skipped_image": _n0(c)}),
    Case("sizes as integral floats", "accepted", edit(lambda d, c: d["images"][0].update(
        height=float(d["images"][0]["height"]), width=float(d["images"][0]["width"]))), check=_same_as_original),
    # ------------------------------------------------------------------------------------- annotations
    Case("bbox of strings", "skipped", ann("bbox", ["380.74", "112.85", "40.62", "248.82"]), ("bbox ['380.74'",),
         lambda c: {"annotation_invalid_field": 1}),
    Case("bbox null", "skipped", ann("bbox", None), ("bbox None is not 4 finite numbers",),
         lambda c: {"annotation_invalid_field": 1}),
    Case("bbox of 3 numbers", "skipped", ann("bbox", [380.74, 112.85, 40.62]), ("bbox [380.74, 112.85, 40.62]",),
         lambda c: {"annotation_invalid_field": 1}),
    Case("bbox an object", "skipped", ann("bbox", {"x": 1}), ("bbox {'x': 1}",),
         lambda c: {"annotation_invalid_field": 1}),
    Case("NaN box coordinate", "skipped", ann("bbox", [380.74, math.nan, 40.62, 248.82]), ("nan",),
         lambda c: {"annotation_invalid_field": 1}),
    Case("negative box width", "skipped", ann("bbox", [380.74, 112.85, -40.62, 248.82]), ("-40.62",),
         lambda c: {"box_degenerate": 1}),
    Case("box 5 px left of the image", "skipped", ann("bbox", [-5.0, 112.85, 40.62, 248.82]), ("in a 426x640 image",),
         lambda c: {"box_outside_image": 1}),
    Case("box 0.5 px left of the image", "accepted", ann("bbox", [-0.5, 112.85, 40.62, 248.82]),
         counts=lambda c: {"box_clipped": 1}, check=_check_clipped),
    Case("iscrowd 2", "skipped", ann("iscrowd", 2), ("iscrowd 2 is not 0 or 1",),
         lambda c: {"annotation_invalid_field": 1}),
    Case("no area, no iscrowd", "accepted",
         edit(lambda d, c: [d["annotations"][0].pop(k) for k in ("area", "iscrowd")]),
         counts=lambda c: {"area_filled": 1, "iscrowd_filled": 1}, check=_check_filled),
    Case("annotation on an unknown image id", "skipped", ann("image_id", 12345), ("image_id 12345",),
         lambda c: {"annotation_unknown_image": 1}),
    Case("annotation of an unknown category", "skipped", ann("category_id", 999), ("category_id 999",),
         lambda c: {"annotation_unknown_category": 1}),
    Case("duplicate annotation id", "skipped",
         edit(lambda d, c: d["annotations"][1].__setitem__("id", d["annotations"][0]["id"])), ("(id 30093",),
         lambda c: {"annotation_duplicate_id": 1}),
    Case("annotation id 0", "skipped", ann("id", 0), ("has id 0",), lambda c: {"annotation_bad_id": 1}),
    Case("annotation id a string", "skipped", ann("id", "30093"), ("has id '30093'",),
         lambda c: {"annotation_bad_id": 1}),
    Case("annotation id 2**70", "skipped", ann("id", 2**70), ("has id 1180591620717411303424",),
         lambda c: {"annotation_bad_id": 1}),
    Case("annotation entry a number", "skipped", _append("annotations", 5), ("annotations[197] is a int",),
         lambda c: {"annotation_missing_keys": 1}),
    Case("annotation without bbox", "skipped", ann("bbox", _DEL), ("lacks ['bbox']",),
         lambda c: {"annotation_missing_keys": 1}),
    # ---------------------------------------------------------------------------------- segmentations
    Case("polygon of 2 points (masks)", "skipped", ann("segmentation", [[1.0, 2.0, 3.0, 4.0]]),
         ("4 coordinates (need an even number >= 6)", "no valid polygon"),
         lambda c: {"polygon_invalid": 1, "annotation_invalid_segmentation": 1}, masks=True),
    Case("polygon of 2 points (boxes only)", "skipped", ann("segmentation", [[1.0, 2.0, 3.0, 4.0]]),
         ("4 coordinates",), lambda c: {"polygon_invalid": 1, "segmentation_removed": 1}, check=_check_box_kept),
    Case("odd coordinates next to a valid polygon (masks)", "skipped",
         edit(lambda d, c: d["annotations"][0]["segmentation"].append([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])),
         ("polygon 1: 7 coordinates",), lambda c: {"polygon_invalid": 1}, masks=True,
         check=_check_partial_polygon),
    Case("polygon with a string coordinate (masks)", "skipped",
         ann("segmentation", [[10.0, 10.0, "30", 10.0, 30.0, 30.0]]), ("not all finite numbers",),
         lambda c: {"polygon_invalid": 1, "annotation_invalid_segmentation": 1}, masks=True),
    Case("polygon as a list of points (masks)", "skipped",
         ann("segmentation", [[[10.0, 10.0], [30.0, 10.0], [30.0, 30.0]]]), ("not all finite numbers",),
         lambda c: {"polygon_invalid": 1, "annotation_invalid_segmentation": 1}, masks=True),
    Case("segmentation a string (masks)", "skipped", ann("segmentation", "polygon"), ("segmentation is a str",),
         lambda c: {"annotation_invalid_segmentation": 1}, masks=True),
    Case("crowd RLE counts short of the image (masks)", "skipped",
         crowd_segm(lambda s: {**s, "counts": s["counts"][:-1]}), ("not non-negative ints summing",),
         lambda c: {"annotation_invalid_segmentation": 1}, masks=True, check=_check_crowd_image_loads),
    Case("crowd RLE compressed garbage (masks)", "skipped", crowd_segm(lambda s: {**s, "counts": "zzzz~~~~"}),
         ("compressed RLE counts are malformed",), lambda c: {"annotation_invalid_segmentation": 1}, masks=True,
         check=_check_crowd_image_loads),
    Case("crowd RLE of another size (masks)", "skipped", crowd_segm(lambda s: {**s, "size": [10, 10]}),
         ("RLE size [10, 10] differs",), lambda c: {"annotation_invalid_segmentation": 1}, masks=True),
    Case("crowd RLE with negative counts (boxes only)", "skipped",
         crowd_segm(lambda s: {**s, "counts": [-5, *s["counts"][1:]]}), ("not non-negative",),
         lambda c: {"segmentation_removed": 1}, check=_check_crowd_kept),
    # ------------------------------------------------------------------------------------- image files
    Case("16-bit grayscale PNG", "accepted", two_images(_png16), check=_pixels_of_image_7),
    Case("palette PNG", "accepted", two_images(_palette), check=_pixels_of_image_7),
    Case("300-megapixel PNG (decompression bomb)", "skipped", two_images(_bomb),
         ("bomb.png", "refused before decoding, as a possible decompression bomb", "300000000 pixels"),
         load_items=True),
    Case("truncated JPEG", "skipped", two_images(_truncated), ("truncated.jpg", "truncated"), load_items=True),
    Case("missing image file", "skipped", two_images(_missing_file), ("not_there.jpg", "no such file"),
         load_items=True),
    Case("image size differs from the annotation", "skipped", two_images(_wrong_size),
         ("small.jpg", "48x32 on disk but 640x480"), load_items=True),
    Case("symlink leading out of the image folder", "skipped", two_images(_symlink_out),
         ("evil.jpg", "outside image_root", "not opened"), load_items=True),
    Case("a folder named like an image", "skipped", two_images(_directory), ("folder.jpg", "not a regular file"),
         load_items=True),
    Case("a text file named .jpg", "skipped", two_images(_not_an_image), ("text.jpg", "cannot identify"),
         load_items=True),
]


# ------------------------------------------------------------------------------------------------ runner
@pytest.fixture(scope="module")
def ctx(tiny_coco_src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """tiny COCO (text, parsed, images folder), the dataset it gives, and one decompression bomb."""
    text = (tiny_coco_src / "annotations.json").read_text(encoding="utf-8")
    bomb = tmp_path_factory.mktemp("bomb") / "bomb.png"
    _png_bomb(bomb)
    return {"text": text, "gt": json.loads(text), "images": tiny_coco_src / "images", "bomb": bomb,
            "reference": CocoDetection(tiny_coco_src / "images", tiny_coco_src / "annotations.json", training=True)}


@pytest.mark.parametrize("case", TABLE, ids=[f"{c.name} [{c.klass}]" for c in TABLE])
def test_bad_dataset(case: Case, ctx: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     caplog: pytest.LogCaptureFixture) -> None:
    ctx = dict(ctx)
    root, ann_file = case.make(tmp_path, ctx)
    opened: list[str] = []
    decoded: list[str] = []

    def spy_load_image(path: Any, **kwargs: Any) -> np.ndarray:
        opened.append(Path(path).name)
        return load_image(path, **kwargs)

    real_decode = ImageFile.ImageFile.load

    def spy_decode(self: ImageFile.ImageFile) -> Any:
        decoded.append(Path(getattr(self, "filename", "") or "").name)
        return real_decode(self)

    monkeypatch.setattr(coco_module, "load_image", spy_load_image)
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_decode)
    make = lambda: CocoDetection(root, ann_file, training=case.training, with_masks=case.masks)  # noqa: E731

    if case.klass == "fatal":
        with pytest.raises(DatasetError) as info:
            make()
        message = str(info.value)
        assert "\n" not in message and ann_file.name in message, message  # one line, naming the file
        for fragment in case.expect:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        return

    caplog.set_level(logging.INFO, logger="resnet_det.data")
    ds = make()
    summary = [r.getMessage() for r in caplog.records if r.name == "resnet_det.data.coco"]
    assert len(summary) == 1, summary  # one summary line when the dataset opens
    counts = {**ds.report.skipped, **ds.report.fixed}
    assert counts == (case.counts(ctx) if case.counts else {}), counts
    if case.load_items:
        caplog.clear()
        items = [ds[i][1]["image_id"] for i in range(len(ds))]
        warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert ds.num_unreadable == 1 and 7 not in items and len(items) == len(ds), warnings
        report = warnings
    else:
        ds[0]  # the rest loads
        report = summary[0]
        for key in counts:
            assert f"[{key}]" in report, report
    for fragment in case.expect:
        assert fragment in report, f"{fragment!r} not in {report!r}"
    assert opened and decoded, "the spies see every image the dataset opens and decodes"
    for name in ("passwd", "evil.jpg"):
        assert name not in opened, f"{name} was opened"
    assert "bomb.png" not in decoded, "the decompression bomb was decoded"
    if case.check is not None:
        case.check(ds, ctx)


def test_the_table_covers_every_class_and_enough_cases() -> None:
    classes = {c.klass for c in TABLE}
    assert classes == {"fatal", "skipped", "accepted"} and len(TABLE) >= 30
    assert len({c.name for c in TABLE}) == len(TABLE), "each row is one case"


# ---------------------------------------------------------------------------------------- the train tool
def _tiny_run(tmp_path: Path, train: str, val: str) -> list[str]:
    return [CONFIG, f"data.root={tmp_path}", "data.train_images=images", "data.val_images=images",
            f"data.train_annotations={train}", f"data.val_annotations={val}", "model.backbone.width=8",
            "model.fpn.channels=16", "model.roi.fc_dim=32", "model.input.min_size=[64]", "model.input.max_size=64",
            "model.input.test_min_size=64", "model.input.test_max_size=64", "data.num_workers=0",
            "solver.ims_per_batch=1", "solver.max_iter=1", "solver.steps=[5]", "solver.warmup_iters=1",
            "train.checkpoint_period=100", "train.log_period=1", "train.max_time_minutes=null", "train.device=cpu",
            f"train.output_dir={tmp_path / 'run'}", "--no-progress"]


@pytest.mark.parametrize("case", [c for c in TABLE if c.name in {"images is an object", "category without id",
                                                                     "not JSON (truncated)"}], ids=lambda c: c.name)
def test_train_tool_refuses_a_fatal_file_in_one_line(case: Case, ctx: dict[str, Any], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    _, ann_file = case.make(tmp_path, ctx)
    (tmp_path / "images").mkdir()
    code = main(["train", *_tiny_run(tmp_path, ann_file.name, ann_file.name)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("resnet-det train: error: ") and "ann.json" in lines[0], lines[0]
    assert all(fragment in lines[0] for fragment in case.expect), lines[0]


def test_train_tool_trains_past_skipped_entries(ctx: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """One file with a byte-order mark and the entries that used to end in a traceback (a bbox of strings,
    a null bbox, 3 numbers, a string image id) or an open() outside the image folder: it trains (exit 0), the
    summary line reports each, nothing outside the folder is opened, no traceback."""
    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path / "cache"))
    shutil.copytree(ctx["images"], tmp_path / "images")
    data = copy.deepcopy(ctx["gt"])
    data["annotations"][0]["bbox"] = ["380.74", "112.85", "40.62", "248.82"]
    data["annotations"][1]["bbox"] = None
    data["annotations"][2]["bbox"] = [1.0, 2.0, 3.0]
    boxed = {a["image_id"] for a in data["annotations"][:3]}
    others = [im for im in data["images"] if im["id"] not in boxed]
    others[0]["id"] = "not a number"
    others[1]["file_name"] = "../../../../etc/passwd"
    (tmp_path / "train.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode("utf-8"))
    # The validation file holds the same bad entries (on fewer images, for speed): the evaluator reads the
    # dataset's validated ground truth, so pycocotools never sees them either.
    val = copy.deepcopy(data)
    keep = boxed | {others[0]["id"], others[1]["id"], others[2]["id"]}
    val["images"] = [im for im in val["images"] if im["id"] in keep]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in keep]
    (tmp_path / "val.json").write_text(json.dumps(val))
    code = main(["train", *_tiny_run(tmp_path, "train.json", "val.json")])
    out = capsys.readouterr()
    log = (tmp_path / "run" / "log.txt").read_text()
    assert code == 0 and "Traceback" not in out.err + out.out + log, out.err[-3000:]
    for name in ("train.json:", "val.json:"):
        line = next(x for x in log.splitlines() if name in x)
        for key in ("annotation_invalid_field", "image_bad_id", "image_bad_file_name"):
            assert f"[{key}]" in line, line
    assert "3 annotations with an invalid field" in line and "final: bbox/AP" in out.out

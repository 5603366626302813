"""The YOLO layout (ultralytics): ``data.yaml``, ``images/<split>/``, ``labels/<split>/*.txt``.

``data.root`` is the folder of ``data.yaml`` (or the file itself). ``data.yaml`` names the classes
(``names: [a, b]`` or ``names: {0: a, 1: b}``; ``nc`` if given must agree) and the splits (``train:`` /
``val:``: a folder of images, a ``.txt`` file listing images, or a list of either), relative to ``path:`` if
given, else to the folder of ``data.yaml``. The label file of an image is its path with the last
``/images/`` replaced by ``/labels/`` and the suffix by ``.txt``; each line is one object:

* ``class cx cy w h``: a box, centre and size normalised by the image's width and height;
* ``class x1 y1 x2 y2 ... xn yn`` (n >= 3): a polygon (instance segmentation), normalised; its box is the
  polygon's extent.

Validation (the counts reach the dataset report, see :mod:`resnet_det.data.formats`): a line with another
number of values, a value that is not a number, a class id that is not an integer in ``0..nc-1``, coordinates
outside ``0..1`` by more than 1% of the image, a box of zero size and a repeated line are skipped; coordinates
outside by less are clipped; an image without a label file is kept with no objects (a background image, as
ultralytics does); an image or label file that cannot be read is skipped. No ``data.yaml``, no ``names`` or
a split that does not exist is fatal.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from ..coco_index import DatasetError, DatasetReport
from . import (
    DatasetFormat,
    DataSource,
    SplitFiles,
    converted_file,
    empty_coco,
    finish_report,
    image_size,
    no_images_error,
    require,
)
from .coco import link_or_copy

LAYOUT = ("the YOLO layout: data.yaml (names, train, val) with images/<split>/ and labels/<split>/*.txt "
          "(`class cx cy w h` per line, normalised) beside it")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
#: Coordinates up to this far outside 0..1 are clipped (rounding in exporters); further out, the line is skipped.
CLIP_TOLERANCE = 0.01

REASONS = {
    "yolo_unreadable_image": "images that cannot be read (not a regular file, an I/O error, not an image)",
    "yolo_unreadable_label": "images whose label file cannot be read",
    "yolo_field_count": "label lines with neither 5 values (class cx cy w h) nor 1 + 2n, n >= 3 (a polygon)",
    "yolo_not_a_number": "label lines with a value that is not a finite number",
    "yolo_class_out_of_range": "label lines whose class id is not an integer in 0..nc-1",
    "yolo_outside_image": "label lines with coordinates outside 0..1 by more than 1%",
    "yolo_empty_box": "label lines of zero width or height",
    "yolo_duplicate_line": "repeated label lines (the same object twice)",
    "yolo_missing_label_file": "images without a label file (kept, with no objects)",
    "yolo_clipped": "label lines with coordinates slightly outside 0..1 (clipped)",
}


def _yaml_file(root: Path) -> Path:
    yml = root if root.suffix in (".yaml", ".yml") else root / "data.yaml"
    return require(yml, "the YOLO dataset file", LAYOUT, root)


def _read_yaml(yml: Path) -> tuple[dict[str, Any], list[str], Path]:
    """``data.yaml`` -> (its mapping, the class names in id order, the base folder of the split paths)."""
    try:
        spec = yaml.safe_load(yml.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DatasetError(f"{yml}: cannot be read as YAML ({' '.join(str(e).split())})") from None
    if not isinstance(spec, dict):
        raise DatasetError(f"{yml}: must be a mapping with names, train and val, got {type(spec).__name__}")
    names = spec.get("names")
    if isinstance(names, dict):
        keys = sorted(names) if all(isinstance(k, int) for k in names) else None
        if keys is None or keys != list(range(len(names))):
            raise DatasetError(f"{yml}: names as a mapping must have the keys 0..{len(names) - 1}, got {list(names)}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise DatasetError(f"{yml}: `names` must be a non-empty list (or 0-based mapping) of class names, "
                           f"got {spec.get('names')!r}")
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise DatasetError(f"{yml}: class names repeat: {names}")
    if "nc" in spec and spec["nc"] != len(names):
        raise DatasetError(f"{yml}: nc={spec['nc']!r} but names has {len(names)} entries")
    base = Path(spec["path"]) if spec.get("path") else yml.parent
    if not base.is_absolute():
        base = yml.parent / base
    return spec, names, base


def _split_images(spec: dict[str, Any], yml: Path, base: Path, split: str) -> list[Path]:
    entry = spec.get(split)
    if entry is None:
        raise DatasetError(f"{yml}: no `{split}:` entry (a folder of images or a .txt list of them)")
    images: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(str(item))
        p = p if p.is_absolute() else base / p
        require(p, f"the {split} images of {yml.name}", LAYOUT, base)
        if p.is_dir():
            for folder, dirs, files in os.walk(p):  # followlinks=False: a symlink loop cannot trap the walk
                dirs.sort()
                images += [Path(folder) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        else:  # a list file, one image per line, relative to the list's folder or absolute
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    q = Path(line.strip())
                    images.append(q if q.is_absolute() else (p.parent / q))
    return images


def label_path(image: Path) -> Path:
    """The label file of ``image``: the last ``/images/`` of its path replaced by ``/labels/``, suffix ``.txt``."""
    s = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in s:
        s = sb.join(s.rsplit(sa, 1))
    return Path(s).with_suffix(".txt")


def _objects(text: str, where: str, nc: int, w: int, h: int, report: DatasetReport) -> list[dict[str, Any]]:
    """The label lines of one image as COCO annotations (without ids)."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[float, ...]] = set()
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        at = f"{where}:{n}"
        if not (len(fields) == 5 or (len(fields) >= 7 and len(fields) % 2 == 1)):
            report.skip("yolo_field_count", f"{at} has {len(fields)} values")
            continue
        try:
            values = tuple(float(f) for f in fields)
        except ValueError:
            report.skip("yolo_not_a_number", f"{at}: {line.strip()[:60]!r}")
            continue
        if not all(math.isfinite(v) for v in values):
            report.skip("yolo_not_a_number", f"{at}: {line.strip()[:60]!r}")
            continue
        cls, coords = values[0], values[1:]
        if cls != int(cls) or not 0 <= cls < nc:
            report.skip("yolo_class_out_of_range", f"{at}: class {fields[0]} (nc={nc})")
            continue
        if values in seen:
            report.skip("yolo_duplicate_line", at)
            continue
        seen.add(values)
        if len(coords) == 4:
            cx, cy, bw, bh = coords
            pts = [(cx - bw / 2, cy - bh / 2), (cx + bw / 2, cy + bh / 2)]
        else:
            pts = list(zip(coords[0::2], coords[1::2]))
        lo, hi = min(min(p) for p in pts), max(max(p) for p in pts)
        if lo < -CLIP_TOLERANCE or hi > 1 + CLIP_TOLERANCE:
            report.skip("yolo_outside_image", f"{at}: a coordinate at {lo if lo < 0 else hi:g}")
            continue
        if lo < 0 or hi > 1:
            report.fix("yolo_clipped", f"{at}: a coordinate at {lo if lo < 0 else hi:g}")
            pts = [(min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)) for x, y in pts]
        xs, ys = [x * w for x, _ in pts], [y * h for _, y in pts]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            report.skip("yolo_empty_box", at)
            continue
        ann: dict[str, Any] = {"category_id": int(cls) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0}
        if len(coords) == 4:
            ann["area"] = (x1 - x0) * (y1 - y0)
        else:
            flat = [v for xy in zip(xs, ys) for v in xy]
            # The polygon's own area (shoelace), as COCO's area of a polygon mask is.
            ann["area"] = abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2
            ann["segmentation"] = [flat]
        out.append(ann)
    return out


def _convert(yml: Path, split: str, images: list[Path], names: list[str]) -> tuple[dict[str, Any], DatasetReport]:
    report = DatasetReport(ann_file=f"{yml} [{split}]", reasons=dict(REASONS))
    coco = empty_coco(names)
    image_root = Path(os.path.commonpath([str(p.parent) for p in images])) if images else yml.parent
    report.images_in_file = len(images)
    for path in images:
        try:
            h, w = image_size(path)
        except OSError as e:
            report.skip("yolo_unreadable_image", " ".join(str(e).split())[:120])
            continue
        labels = label_path(path)
        text = ""
        try:
            text = labels.read_text(encoding="utf-8")
        except FileNotFoundError:
            report.fix("yolo_missing_label_file", str(labels))
        except (OSError, UnicodeDecodeError) as e:
            report.skip("yolo_unreadable_label", f"{labels}: {type(e).__name__}")
            continue
        image_id = len(coco["images"]) + 1
        coco["images"].append({"id": image_id, "file_name": str(path.relative_to(image_root)), "height": h,
                               "width": w})
        report.annotations_in_file += sum(1 for line in text.splitlines() if line.strip())
        for ann in _objects(text, str(labels), len(names), w, h, report):
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id, **ann})
    if not coco["images"]:
        raise no_images_error(report, f"{yml} [{split}]")
    finish_report(report, coco)
    coco["info"] = {"description": f"converted from YOLO {yml} [{split}]", "image_root": str(image_root)}
    return coco, report


def resolve(data: DataSource, split: str) -> SplitFiles:
    """The split converted to a cached COCO file (converted again when an image or label file changes)."""
    root = Path(str(data.root)).expanduser()
    yml = _yaml_file(root)
    spec, names, base = _read_yaml(yml)
    images = _split_images(spec, yml, base, split)
    if not images:
        raise DatasetError(f"{yml}: the {split} split lists no image (suffixes {sorted(IMAGE_SUFFIXES)})")
    out = converted_file("yolo", yml, split, [yml, *images, *map(label_path, images)],
                         lambda: _convert(yml, split, images, names))
    image_root = Path(os.path.commonpath([str(p.parent) for p in images]))
    return SplitFiles(image_root=image_root, ann_file=out)


def _fmt(v: float) -> str:
    return f"{v:.8f}".rstrip("0").rstrip(".") or "0"


def write(coco: dict[str, Any], image_root: Path, out: Path, split: str) -> None:
    """``out/images/<split>/``, ``out/labels/<split>/*.txt`` and ``out/data.yaml`` from a COCO split.

    A single-polygon segmentation becomes a polygon line, anything else a box line; crowd regions are left
    out (YOLO labels have no ignore regions).
    """
    cats = sorted(c["id"] for c in coco["categories"])
    index = {c: i for i, c in enumerate(cats)}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_image: dict[Any, list[str]] = {img["id"]: [] for img in coco["images"]}
    sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
    for ann in coco["annotations"]:
        if ann.get("iscrowd"):
            continue
        w, h = sizes[ann["image_id"]]
        segm = ann.get("segmentation")
        if isinstance(segm, list) and len(segm) == 1 and len(segm[0]) >= 6:
            coords = [v / (w if i % 2 == 0 else h) for i, v in enumerate(segm[0])]
        else:
            x, y, bw, bh = ann["bbox"]
            coords = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
        by_image[ann["image_id"]].append(" ".join([str(index[ann["category_id"]]), *map(_fmt, coords)]))
    for img in coco["images"]:
        rel = Path(img["file_name"])
        link_or_copy(image_root / rel, out / "images" / split / rel)
        lines = by_image[img["id"]]
        label = out / "labels" / split / rel.with_suffix(".txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    spec = {"train": "images/train", "val": "images/val", "nc": len(cats), "names": [names[c] for c in cats]}
    (out / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


FORMAT = DatasetFormat("yolo", layout=LAYOUT, resolve=resolve, write=write)

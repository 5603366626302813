"""The Pascal VOC layout: ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``, ``ImageSets/Main/<split>.txt``.

``data.root`` is the folder that holds the three (``VOCdevkit/VOC2007``). A split is the id list
``ImageSets/Main/train.txt`` / ``val.txt``; another list (``trainval.txt``, ``test.txt``) is chosen with
``data.train_annotations=ImageSets/Main/trainval.txt`` (any value ending in ``.txt``, relative to the root).
The classes are VOC's 20 when every object's name is one of them (in VOC's order), else the sorted names
found in the train and val lists together (so both splits agree).

Boxes: VOC's ``bndbox`` holds 1-based pixel indices, ``xmin..xmax`` inclusive; the COCO box is
``[xmin - 1, ymin - 1, xmax, ymax]`` in xyxy (as detectron2 reads VOC). ``difficult`` objects become crowd
regions: ignored by the COCO evaluation (a detection on one is neither a true nor a false positive, VOC's own
rule) and left out of the training targets.

Validation (counted in the dataset report): a listed id without an XML file, an XML that does not parse and
an image that cannot be read are skipped; an XML without a usable ``size`` takes the image's own size; an
object without a name, without a numeric ``bndbox``, or empty after clipping to the image is skipped; a box
reaching outside the image is clipped. No split list is fatal.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

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

LAYOUT = "the Pascal VOC layout: Annotations/<id>.xml, JPEGImages/<id>.jpg and ImageSets/Main/<split>.txt"
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

REASONS = {
    "voc_missing_xml": "listed ids without an Annotations/<id>.xml file",
    "voc_bad_xml": "XML files that cannot be read or parsed",
    "voc_unreadable_image": "images that are missing or cannot be read",
    "voc_size_from_image": "XML files without a usable <size> (the image's size is used)",
    "voc_object_without_name": "objects without a <name>",
    "voc_bad_bndbox": "objects without a numeric <bndbox> (xmin, ymin, xmax, ymax)",
    "voc_empty_box": "objects of zero width or height (after clipping to the image)",
    "voc_box_clipped": "objects reaching outside the image (clipped)",
}


def _split_list(root: Path, data: DataSource, split: str) -> Path:
    configured = data.train_annotations if split == "train" else data.val_annotations
    rel = configured if str(configured).endswith(".txt") else f"ImageSets/Main/{split}.txt"
    return require(root / rel, f"the {split} id list", LAYOUT, root)


def _ids(list_file: Path) -> list[str]:
    # The segmentation lists and the per-class lists put more columns on a line: the id comes first.
    return [line.split()[0] for line in list_file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _parse(xml_file: Path) -> ET.Element:
    return ET.parse(xml_file).getroot()


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text else None


def _names(root: Path, ids: list[str]) -> list[str]:
    found: set[str] = set()
    for i in ids:
        try:
            tree = _parse(root / "Annotations" / f"{i}.xml")
        except (OSError, ET.ParseError):
            continue
        found |= {n for n in (_text(o, "name") for o in tree.iter("object")) if n}
    if found <= set(VOC_CLASSES):
        return list(VOC_CLASSES)
    return sorted(found)


def _image_file(root: Path, image_id: str, tree: ET.Element) -> Path:
    own = root / "JPEGImages" / f"{image_id}.jpg"
    if own.exists():
        return own
    named = _text(tree, "filename")
    return root / "JPEGImages" / named if named else own


def _convert(root: Path, split: str, ids: list[str], names: list[str]) -> tuple[dict[str, Any], DatasetReport]:
    where = f"{root} [{split}]"
    report = DatasetReport(ann_file=where, reasons=dict(REASONS))
    report.images_in_file = len(ids)
    coco = empty_coco(names)
    cat = {n: i for i, n in enumerate(names, 1)}
    for image_id in ids:
        xml_file = root / "Annotations" / f"{image_id}.xml"
        if not xml_file.exists():
            report.skip("voc_missing_xml", str(xml_file))
            continue
        try:
            tree = _parse(xml_file)
        except (OSError, ET.ParseError) as e:
            report.skip("voc_bad_xml", f"{xml_file}: {' '.join(str(e).split())[:80]}")
            continue
        path = _image_file(root, image_id, tree)
        try:
            h, w = image_size(path)
        except OSError as e:
            report.skip("voc_unreadable_image", " ".join(str(e).split())[:120])
            continue
        size = tree.find("size")
        try:
            if (int(float(_text(size, "width") or "")), int(float(_text(size, "height") or ""))) != (w, h):
                raise ValueError
        except ValueError:
            report.fix("voc_size_from_image", f"{xml_file} (image {w}x{h})")
        num = len(coco["images"]) + 1
        coco["images"].append({"id": num, "file_name": str(path.relative_to(root / "JPEGImages")), "height": h,
                               "width": w})
        for obj in tree.iter("object"):
            report.annotations_in_file += 1
            name = _text(obj, "name")
            if not name or name not in cat:
                report.skip("voc_object_without_name", f"{xml_file}: an object named {name!r}")
                continue
            box = obj.find("bndbox")
            try:
                x0, y0, x1, y1 = (float(_text(box, k) or "") for k in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError:
                report.skip("voc_bad_bndbox", f"{xml_file}: {name}")
                continue
            x0, y0 = x0 - 1, y0 - 1  # 1-based inclusive pixel indices -> continuous coordinates
            cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))
            if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
                report.skip("voc_empty_box", f"{xml_file}: {name} [{x0 + 1:g}, {y0 + 1:g}, {x1:g}, {y1:g}]")
                continue
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                report.fix("voc_box_clipped", f"{xml_file}: {name} to the {w}x{h} image")
            difficult = _text(obj, "difficult") in ("1", "true")
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": num, "category_id": cat[name],
                                        "bbox": [cx0, cy0, cx1 - cx0, cy1 - cy0],
                                        "area": (cx1 - cx0) * (cy1 - cy0), "iscrowd": int(difficult)})
    if not coco["images"]:
        raise no_images_error(report, where)
    finish_report(report, coco)
    coco["info"] = {"description": f"converted from Pascal VOC {where}"}
    return coco, report


def resolve(data: DataSource, split: str) -> SplitFiles:
    """The split converted to a cached COCO file (converted again when a list, XML or image changes)."""
    root = Path(str(data.root)).expanduser()
    list_file = _split_list(root, data, split)
    ids = _ids(list_file)
    if not ids:
        raise DatasetError(f"{list_file}: lists no image id")
    lists = [_split_list(root, data, s) for s in ("train", "val") if s == split or _has_list(root, data, s)]
    all_ids = sorted({i for f in lists for i in _ids(f)})
    xmls = [root / "Annotations" / f"{i}.xml" for i in all_ids]
    images = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    out = converted_file("voc", root, split, [*lists, *xmls, *images],
                         lambda: _convert(root, split, ids, _names(root, all_ids)))
    return SplitFiles(image_root=root / "JPEGImages", ann_file=out)


def _has_list(root: Path, data: DataSource, split: str) -> bool:
    try:
        _split_list(root, data, split)
    except FileNotFoundError:
        return False
    return True


def _num(v: float) -> str:
    return f"{v:.4f}".rstrip("0").rstrip(".") or "0"


def write(coco: dict[str, Any], image_root: Path, out: Path, split: str) -> None:
    """``out/JPEGImages/``, ``out/Annotations/*.xml`` and ``out/ImageSets/Main/<split>.txt`` from a COCO split.

    Ids are ``<split>_<file stem>`` (the two splits share the folders); crowd regions are written as
    ``difficult`` objects. Images that are not JPEG are re-encoded as JPEG quality 95.
    """
    from PIL import Image

    names = {c["id"]: c["name"] for c in coco["categories"]}
    anns: dict[Any, list[dict[str, Any]]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        anns[ann["image_id"]].append(ann)
    ids = []
    for img in coco["images"]:
        rel = Path(img["file_name"])
        image_id = f"{split}_{'_'.join(rel.with_suffix('').parts)}"
        ids.append(image_id)
        src, dst = image_root / rel, out / "JPEGImages" / f"{image_id}.jpg"
        if src.suffix.lower() in (".jpg", ".jpeg"):
            link_or_copy(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                im.convert("RGB").save(dst, quality=95)
        node = ET.Element("annotation")
        ET.SubElement(node, "filename").text = dst.name
        size = ET.SubElement(node, "size")
        for tag, v in (("width", img["width"]), ("height", img["height"]), ("depth", 3)):
            ET.SubElement(size, tag).text = str(v)
        for ann in anns[img["id"]]:
            obj = ET.SubElement(node, "object")
            ET.SubElement(obj, "name").text = names[ann["category_id"]]
            ET.SubElement(obj, "difficult").text = str(int(bool(ann.get("iscrowd"))))
            x, y, bw, bh = ann["bbox"]
            box = ET.SubElement(obj, "bndbox")
            for tag, v in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + bw), ("ymax", y + bh)):
                ET.SubElement(box, tag).text = _num(v)
        xml_file = out / "Annotations" / f"{image_id}.xml"
        xml_file.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(node).write(xml_file, encoding="utf-8")
    lst = out / "ImageSets" / "Main" / f"{split}.txt"
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


FORMAT = DatasetFormat("voc", layout=LAYOUT, resolve=resolve, write=write)

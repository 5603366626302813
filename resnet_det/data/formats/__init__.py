"""Dataset formats by name (``data.format``): a new layout is one module and one line in :data:`BUILTIN`.

The protocol is small. A format turns one split of a folder in its own layout into the files the project's
COCO-format dataset reads (:class:`~resnet_det.data.coco.CocoDetection`): an image folder and a COCO
instances file. Layouts that are not COCO (YOLO's label files, Pascal VOC's XML) are *converted* once, with
their own validation, into a COCO file in the cache (``$RESNET_DET_CACHE/converted``, keyed by the files'
names, sizes and modification times, so a changed label file converts again). From there everything is
the same for every format:

* an item is ``(image, target)`` as :class:`~resnet_det.data.coco.CocoDetection` yields it (boxes xyxy in
  pixels, labels ``1..K``, masks when the task needs them);
* the categories are the COCO file's (``dataset.class_names``, ``dataset.label_to_cat_id``);
* the ground truth for evaluation is that COCO file, so every format is evaluated with the COCO metrics
  (regions a format marks as ignored, VOC's ``difficult``, become crowd regions: ignored by COCOeval and
  left out of the training targets).

What a conversion skipped or repaired (a label line with 4 numbers, a class id out of range, an XML without
``size``, ...) is counted in a :class:`~resnet_det.data.coco_index.DatasetReport`, logged as one line that
reaches the console and ``log.txt``, like the COCO file's own report; what makes the data unusable (no
``data.yaml``, no split list) raises :class:`~resnet_det.data.coco_index.DatasetError`.

A format may also *write* a COCO split in its layout (``resnet-det make-shapes --format yolo``,
``resnet-det convert --to``).

Adding a format::

    # resnet_det/data/formats/myformat.py
    FORMAT = DatasetFormat("myformat", layout="...", resolve=..., write=...)
    # and its name in BUILTIN below (or, outside the library: register_format(FORMAT))
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from resnet_det_common import atomic_write

from ..coco_index import DatasetError, DatasetReport

__all__ = [
    "BUILTIN",
    "DataSource",
    "DatasetFormat",
    "Source",
    "SplitFiles",
    "convert",
    "converted_file",
    "finish_report",
    "format_names",
    "get_format",
    "image_size",
    "register_format",
]

logger = logging.getLogger(__name__)

#: The formats the library ships, by module name under ``resnet_det.data.formats`` (imported on first use).
BUILTIN: tuple[str, ...] = (
    "coco",
    "yolo",
    "voc",
)

#: Bump when a converter's output changes for the same input (cached conversions are then redone).
CONVERTER_VERSION = 1


class DataSource(Protocol):
    """What a format reads of the data config (``resnet_det.config.DataConfig`` has these fields)."""

    root: str | None
    train_images: str
    train_annotations: str
    val_images: str
    val_annotations: str


@dataclass(frozen=True)
class SplitFiles:
    """One split as the COCO-format dataset reads it.

    Attributes:
        image_root: The folder that ``file_name`` entries are relative to.
        ann_file: A COCO instances JSON file.
        semantic_root: Semantic PNGs (the synthetic shapes only), else None.
    """

    image_root: Path
    ann_file: Path
    semantic_root: Path | None = None


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset layout.

    Attributes:
        name: The ``data.format`` value.
        layout: One line saying what folder this format expects under ``data.root`` (used in errors).
        resolve: ``resolve(data, split) -> SplitFiles`` for ``split`` in ``("train", "val")``; converts to a
            COCO file (:func:`converted_file`) when the layout is not COCO. Raises ``FileNotFoundError`` /
            :class:`~resnet_det.data.coco_index.DatasetError` with what is missing and where.
        write: ``write(coco: dict, image_root: Path, out: Path, split: str) -> None`` writes one COCO split
            in this layout under ``out`` (images linked or copied from ``image_root``), or None if the format
            is read-only.
    """

    name: str
    layout: str
    resolve: Callable[[DataSource, str], SplitFiles]
    write: Callable[[dict[str, Any], Path, Path, str], None] | None = None


_REGISTRY: dict[str, DatasetFormat] = {}


def register_format(fmt: DatasetFormat) -> DatasetFormat:
    """Makes ``fmt`` available as ``data.format: <fmt.name>``; a name registered twice raises."""
    if not isinstance(fmt, DatasetFormat):
        raise TypeError(f"register_format takes a DatasetFormat, got {type(fmt).__name__}")
    if fmt.name in _REGISTRY and _REGISTRY[fmt.name] is not fmt:
        raise ValueError(f"dataset format {fmt.name!r} is registered twice")
    _REGISTRY[fmt.name] = fmt
    return fmt


def format_names() -> tuple[str, ...]:
    """Every format name: the built-in ones, then those registered from outside."""
    return (*BUILTIN, *sorted(set(_REGISTRY) - set(BUILTIN)))


def get_format(name: str) -> DatasetFormat:
    """The format called ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    if name not in _REGISTRY and name in BUILTIN:
        register_format(importlib.import_module(f"{__name__}.{name}").FORMAT)
    if name not in _REGISTRY:
        raise ValueError(f"data.format={name!r} is not a dataset format; use one of {list(format_names())}")
    return _REGISTRY[name]


# ------------------------------------------------------------------------------------- conversion cache
def _cache_dir() -> Path:
    base = os.environ.get("RESNET_DET_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "resnet_det") / "converted"


def _fingerprint(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        try:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # unreadable: part of the key as such (the converter counts it)
            h.update(f"{f}\0missing\n".encode())
    return h.hexdigest()[:16]


def converted_file(fmt: str, root: Path, split: str, inputs: Iterable[Path],
                   convert: Callable[[], tuple[dict[str, Any], DatasetReport]]) -> Path:
    """The cached COCO file converted from ``inputs`` (the files the conversion reads), made on first use.

    ``convert()`` returns the COCO dict and its report; the report is logged each time the split opens (it is
    stored beside the file, so a cached conversion reports what the first one found).

    Raises:
        DatasetError: The conversion found nothing usable (raised by ``convert``).
    """
    key = _fingerprint(sorted(inputs))
    stem = f"{fmt}-{split}-v{CONVERTER_VERSION}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}-{key}"
    out = _cache_dir() / f"{stem}.json"
    report_file = out.with_suffix(".report.json")
    if out.is_file() and report_file.is_file():
        report = DatasetReport.from_dict(json.loads(report_file.read_text()))
    else:
        coco, report = convert()
        atomic_write(out, json.dumps(coco, separators=(",", ":")), durable=False)
        atomic_write(report_file, json.dumps(report.as_dict()), durable=False)
    (logger.warning if report.skipped else logger.info)("%s (converted to %s)", report.summary(), out)
    return out


def require(path: Path, what: str, fmt: DatasetFormat | str, root: Path) -> Path:
    """``path`` if it exists, else a ``FileNotFoundError`` naming it, the root and the layout expected."""
    if not path.exists():
        layout = fmt.layout if isinstance(fmt, DatasetFormat) else fmt
        raise FileNotFoundError(f"{path} does not exist: {what} (data.root={str(root)!r}); expected {layout}")
    return path


def empty_coco(names: Iterable[str]) -> dict[str, Any]:
    """A COCO dict with ``names`` as categories 1..K and no images yet."""
    return {"images": [], "annotations": [],
            "categories": [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(names, 1)]}


def no_images_error(report: DatasetReport, where: str) -> DatasetError:
    """The error of a split with no usable image."""
    return DatasetError(f"{where}: no usable image ({report.summary()})")


@dataclass(frozen=True)
class Source:
    """A plain :class:`DataSource` (the data config's fields, COCO's defaults): for conversions."""

    root: str | None
    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"


def convert(source: DataSource, src_format: str, dst_format: str, out: str | os.PathLike[str],
            splits: Iterable[str] = ("train", "val")) -> Path:
    """Writes ``splits`` of ``source`` (in ``src_format``'s layout) into ``out`` in ``dst_format``'s layout.

    Reading goes through the source format's validation (its report is logged); the destination's writer lays
    out the images (hard links where possible) and its label files. ``resnet-det convert`` calls this.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        ValueError: An unknown format, or a destination format that cannot be written.
        FileNotFoundError, DatasetError: The source is missing or unusable.
    """
    src, dst = get_format(src_format), get_format(dst_format)
    if dst.write is None:
        raise ValueError(f"dataset format {dst.name!r} can be read but not written; write one of "
                         f"{[n for n in format_names() if get_format(n).write is not None]}")
    out = Path(out)
    for split in splits:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        files = src.resolve(source, split)
        coco = json.loads(Path(files.ann_file).read_text())
        dst.write(coco, Path(files.image_root), out, split)
        logger.info("%s %s -> %s (%s): %d images, %d annotations", src.name, split, out, dst.name,
                    len(coco["images"]), len(coco["annotations"]))
    return out


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image as the dataset will load it (EXIF-oriented), from its header alone.

    Raises:
        OSError: The path is not a regular file (a FIFO, a device: never opened, so never blocks), or it
            cannot be read or is not an image.
    """
    import stat

    from PIL import Image, UnidentifiedImageError

    from ..images import _oriented_size

    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"{path} is not a regular file")
    try:
        with Image.open(path) as im:
            return _oriented_size(im, True)
    except (UnidentifiedImageError, ValueError, SyntaxError) as e:  # Pillow's "not an image" / bad header
        raise OSError(f"{path}: {e}") from e


def finish_report(report: DatasetReport, coco: dict[str, Any]) -> None:
    """Fills the report's totals from the converted COCO dict."""
    report.num_images = len(coco["images"])
    report.num_annotations = len(coco["annotations"])
    report.num_crowd = sum(1 for a in coco["annotations"] if a.get("iscrowd"))
    report.num_categories = len(coco["categories"])

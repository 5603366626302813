"""The COCO layout: ``<root>/train2017/``, ``<root>/val2017/``, ``<root>/annotations/instances_*.json``.

The folder and file names are the ``data.train_images`` / ``data.train_annotations`` / ``data.val_*`` keys
(relative to ``data.root``), so any COCO-format dataset works without conversion.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from resnet_det_common import atomic_write

from . import DatasetFormat, DataSource, SplitFiles, require

LAYOUT = ("the COCO layout: data.train_images / data.val_images folders and data.train_annotations / "
          "data.val_annotations COCO instances files, relative to data.root (defaults train2017/, val2017/, "
          "annotations/instances_{train,val}2017.json)")


def resolve(data: DataSource, split: str) -> SplitFiles:
    """The split's image folder and annotation file, as the data config names them."""
    root = Path(str(data.root)).expanduser()
    images = root / (data.train_images if split == "train" else data.val_images)
    ann = root / (data.train_annotations if split == "train" else data.val_annotations)
    require(images, f"the {split} images folder", LAYOUT, root)
    require(ann, f"the {split} annotation file", LAYOUT, root)
    return SplitFiles(image_root=images, ann_file=ann)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` where the filesystem allows it, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write(coco: dict[str, Any], image_root: Path, out: Path, split: str) -> None:
    """``out/<split>2017/`` (the images) and ``out/annotations/instances_<split>2017.json``."""
    for img in coco["images"]:
        link_or_copy(image_root / img["file_name"], out / f"{split}2017" / img["file_name"])
    atomic_write(out / "annotations" / f"instances_{split}2017.json", json.dumps(coco))


FORMAT = DatasetFormat("coco", layout=LAYOUT, resolve=resolve, write=write)

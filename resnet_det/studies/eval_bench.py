"""COCO evaluation at val2017 scale: ``resnet-det eval`` against pycocotools and faster-coco-eval.

:func:`generate_eval_set` writes a synthetic, seeded val2017-sized set: an instances file (5,000 images,
36,781 instances, the 80 COCO categories, polygons and ~1% crowd RLE: the generator of
:mod:`resnet_det.studies.startup`) and results files with 100 detections per image (500,000), half of
them near a ground-truth box of the image (jittered, 90% with its category), half anywhere, scores with
4 decimals (so ties occur, as with float32 scores). ``results_bbox.json`` holds ``bbox`` entries,
``results_segm.json`` compressed-RLE ``segmentation`` entries (the detection's box as a mask).

:func:`run` measures, each in a fresh process, ``repeats`` times, interleaved:

* ``ours``: the whole command ``python -m resnet_det eval --results R --annotations A --output-dir D``
  (start-up, reading, validation, evaluation, tables, the PR plot and metrics.json);
* ``pycocotools``: ``COCO(A)``, ``loadRes(R)``, ``COCOeval`` evaluate / accumulate / summarize (its README);
* ``faster-coco-eval``: the same with ``faster_coco_eval.COCO`` and ``COCOeval_faster`` (its README).

Time is the child's wall time from start to exit as the parent sees it (interpreter start-up and imports
included, for all three); memory is the child's peak RSS (``ru_maxrss`` from ``wait4``). The parent stays
small (generation happens in a child) because Linux carries a parent's RSS into a child it starts.

``dist`` (optional, ``--dist-ranks``): a distributed evaluation of the same bbox predictions with
:class:`detection.evaluation.COCOEvaluator` in ``W`` gloo processes (each rank converts and processes its
share of the images, writes its shard, rank 0 evaluates from the shards), for ``W`` in the given world
sizes; reported: rank 0's peak RSS and wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .startup import COCO_CATEGORIES, generate_coco_file, machine

__all__ = ["MODES", "format_table", "generate_eval_set", "rectangle_rle", "run", "write_record"]

MODES = ("ours", "pycocotools", "faster-coco-eval")
IOU_TYPES = ("bbox", "segm")


# ------------------------------------------------------------------------------------------------ generator
def _encode_int(x: int) -> str:
    """One count of pycocotools' compressed RLE string (5 bits per character, sign-extended, + 48)."""
    out = []
    more = True
    while more:
        c = x & 0x1F
        x >>= 5
        more = (x != -1) if (c & 0x10) else (x != 0)
        if more:
            c |= 0x20
        out.append(chr(c + 48))
    return "".join(out)


def rectangle_rle(x0: int, y0: int, x1: int, y1: int, h: int, w: int) -> str:
    """Compressed RLE ``counts`` of the rectangle ``[x0, x1) x [y0, y1)`` in an ``h x w`` image.

    Written directly (no mask is drawn): the column-major counts are ``[x0*h + y0, o, h-o, o, ..., o, rest]``
    with ``o = y1 - y0``, and pycocotools' string stores ``counts[i] - counts[i-2]`` for ``i > 2``, which is 0
    for every repeated column. Canonical (equal to ``mask.encode`` of the drawn mask) when
    ``0 < y1 - y0 < h`` and the rectangle does not end in the image's last pixel.
    """
    ones, gap = y1 - y0, h - (y1 - y0)
    head = x0 * h + y0
    rest = (h - y1) + (w - x1) * h
    if x1 - x0 == 1:
        return _encode_int(head) + _encode_int(ones) + _encode_int(rest)
    return (_encode_int(head) + _encode_int(ones) + _encode_int(gap) + "0" * (2 * (x1 - x0) - 3)
            + _encode_int(rest - gap))


def _detections(gt: dict[str, Any], per_image: int, seed: int) -> dict[str, np.ndarray]:
    """Columns of the detections: image, category, score, box (xywh) and the integer rectangle (segm)."""
    rng = np.random.default_rng(seed + 1)
    images = gt["images"]
    n_img = len(images)
    hw = np.array([[im["height"], im["width"]] for im in images], dtype=np.float64)
    pos = {im["id"]: k for k, im in enumerate(images)}
    anns = [a for a in gt["annotations"] if not a["iscrowd"]]
    a_img = np.array([pos[a["image_id"]] for a in anns], dtype=np.int64)
    a_box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    a_cat = np.array([a["category_id"] for a in anns], dtype=np.int64)
    order = np.argsort(a_img, kind="stable")
    a_img, a_box, a_cat = a_img[order], a_box[order], a_cat[order]
    first = np.searchsorted(a_img, np.arange(n_img))
    count = np.searchsorted(a_img, np.arange(n_img), side="right") - first
    cat_ids = np.array([c[0] for c in COCO_CATEGORIES])

    img = np.repeat(np.arange(n_img), per_image)
    near = (np.tile(np.arange(per_image), n_img) < per_image // 2) & (count[img] > 0)
    n = len(img)
    h, w = hw[img, 0], hw[img, 1]
    # near a ground-truth box: one of the image's boxes, moved and rescaled by ~10%
    pick = first[img] + (rng.random(n) * np.maximum(count[img], 1)).astype(np.int64)
    pick = np.minimum(pick, len(a_box) - 1)
    gb = a_box[pick]
    bw = np.where(near, gb[:, 2] * np.exp(rng.normal(0, 0.12, n)), w * np.exp(rng.uniform(np.log(0.03), np.log(0.7), n)))
    bh = np.where(near, gb[:, 3] * np.exp(rng.normal(0, 0.12, n)), h * np.exp(rng.uniform(np.log(0.03), np.log(0.7), n)))
    cx = np.where(near, gb[:, 0] + gb[:, 2] / 2 + rng.normal(0, 0.08, n) * gb[:, 2], rng.uniform(0, w))
    cy = np.where(near, gb[:, 1] + gb[:, 3] / 2 + rng.normal(0, 0.08, n) * gb[:, 3], rng.uniform(0, h))
    # integer rectangles strictly inside the image (at least 1 pixel, never the full height nor the last pixel:
    # see rectangle_rle), and the float box is that rectangle: bbox and segm describe the same detection
    x0 = np.clip(np.floor(cx - bw / 2), 0, w - 2).astype(np.int64)
    y0 = np.clip(np.floor(cy - bh / 2), 0, h - 2).astype(np.int64)
    x1 = np.clip(np.ceil(cx + bw / 2), x0 + 1, w - 1).astype(np.int64)
    y1 = np.clip(np.ceil(cy + bh / 2), y0 + 1, h - 1).astype(np.int64)
    cat = np.where(near & (rng.random(n) < 0.9), a_cat[pick], cat_ids[rng.integers(0, len(cat_ids), n)])
    score = np.round(np.where(near, rng.uniform(0.2, 1.0, n), rng.uniform(0.0, 0.8, n)), 4)
    image_id = np.array([im["id"] for im in images], dtype=np.int64)[img]
    return {"image_id": image_id, "category_id": cat, "score": score, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
            "h": h.astype(np.int64), "w": w.astype(np.int64)}


def generate_eval_set(work_dir: str | os.PathLike[str], *, images: int = 5000, instances: int = 36781,
                      per_image: int = 100, seed: int = 0, iou_types: tuple[str, ...] = IOU_TYPES) -> dict[str, Any]:
    """Writes ``annotations.json`` and ``results_<iou_type>.json`` into ``work_dir`` (see the module docstring).

    The content depends only on the arguments (same seed, same bytes).

    Args:
        work_dir: The folder (created).
        images: Images of the instances file.
        instances: Annotations of the instances file.
        per_image: Detections per image.
        seed: Seed of everything random.
        iou_types: Which results files to write.

    Returns:
        ``{"annotations": path, "results": {iou_type: path}, "images", "instances", "detections", "bytes",
        "seconds"}``.
    """
    from resnet_det.common.io import atomic_write

    start = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ann_path = work / "annotations.json"
    generate_coco_file(ann_path, images=images, instances=instances, seed=seed)
    with open(ann_path, encoding="utf-8") as f:
        gt = json.load(f)
    cols = _detections(gt, per_image, seed)
    del gt
    ids, cats, scores = cols["image_id"].tolist(), cols["category_id"].tolist(), cols["score"].tolist()
    x0, y0, x1, y1 = (cols[k].tolist() for k in ("x0", "y0", "x1", "y1"))
    out: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for iou_type in iou_types:
        path = work / f"results_{iou_type}.json"
        if iou_type == "bbox":
            rows = [{"image_id": i, "category_id": c, "bbox": [a, b, e - a, d - b], "score": s}
                    for i, c, s, a, b, e, d in zip(ids, cats, scores, x0, y0, x1, y1)]
        else:
            hs, ws = cols["h"].tolist(), cols["w"].tolist()
            rows = [{"image_id": i, "category_id": c,
                     "segmentation": {"size": [hh, ww], "counts": rectangle_rle(a, b, e, d, hh, ww)}, "score": s}
                    for i, c, s, a, b, e, d, hh, ww in zip(ids, cats, scores, x0, y0, x1, y1, hs, ws)]
        atomic_write(path, json.dumps(rows), durable=False)
        del rows
        out[iou_type] = str(path)
        sizes[iou_type] = path.stat().st_size
    return {"annotations": str(ann_path), "results": out, "images": images, "instances": instances,
            "detections": len(ids), "bytes": {"annotations": ann_path.stat().st_size, **sizes},
            "seconds": round(time.perf_counter() - start, 1)}

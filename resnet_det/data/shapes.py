"""Synthetic "shapes" dataset: the project's built-in, download-free detection data.

Images show 1-4 (by default) filled shapes (circle, square, triangle, star; optionally hexagon and
ellipse) of random size (10%-50% of the shorter image side), colour, position and rotation, on a
textured background (gradients, stripes, checkers, smooth blobs, pixel noise). Shapes may overlap:
later shapes occlude earlier ones, and every instance's mask, box and area describe its VISIBLE
part. A shape with less than ``min_visible`` (40%) of its area visible is removed before the image
is rendered, so no unlabelled fragment appears in the image.

Layout written by :func:`make_shapes`::

    <root>/train/000001.jpg ...            JPEG, quality 95, 4:4:4 chroma
    <root>/val/000001.jpg ...
    <root>/annotations/instances_train.json   COCO instances (RLE segmentation, iscrowd 0)
    <root>/annotations/instances_val.json
    <root>/semantic/train/000001.png ...    uint8 label map: 0 background, 1..K classes
    <root>/semantic/val/000001.png ...
    <root>/meta.json                        generation parameters and counts

Ids start at 1 (image id = file number; annotation ids count up within a split), category ids are
``1..K`` in the order of ``classes``. Boxes are ``[x, y, w, h]`` of the visible mask in pixel-edge
coordinates (integers stored as floats); ``area`` is the visible pixel count.

Determinism: image ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])``,
so the same parameters give byte-identical JSON files and identical pixels (on the same Pillow /
libjpeg build, which encodes the JPEGs), whatever the other split's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from resnet_det_common import progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CLASSES",
    "GENERATOR_VERSION",
    "SHAPE_CLASSES",
    "OutputExistsError",
    "default_cache_root",
    "ensure_shapes",
    "make_shapes",
    "render_image",
    "shapes_paths",
]

#: Every shape the generator can draw.
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "ellipse")
#: The default classes (category ids 1..4 in this order).
DEFAULT_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star")
#: Bumped whenever the rendering changes, so cached datasets are regenerated.
GENERATOR_VERSION = 1

_SPLIT_CODES = {"train": 0, "val": 1}
_SHIFT = 4  # cv2 sub-pixel bits for polygon/circle drawing


class OutputExistsError(FileExistsError, ValueError):
    """The output folder of :func:`make_shapes` already exists (pass ``overwrite=True``)."""


def _params(
    *,
    num_train: int,
    num_val: int,
    image_size: int,
    max_image_size: int | None,
    min_shapes: int,
    max_shapes: int,
    seed: int,
    classes: Sequence[str],
    min_visible: float,
    min_rel_size: float,
    max_rel_size: float,
) -> dict[str, Any]:
    """Validates the generation parameters and returns them as a canonical dict."""

    def _int(name: str, v: Any, lo: int) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"make_shapes: {name} must be an integer >= {lo}, got {v!r}")
        return int(v)

    p: dict[str, Any] = {
        "num_train": _int("num_train", num_train, 1),
        "num_val": _int("num_val", num_val, 1),
        "image_size": _int("image_size", image_size, 32),
        "max_image_size": None if max_image_size is None else _int("max_image_size", max_image_size, 32),
        "min_shapes": _int("min_shapes", min_shapes, 0),
        "max_shapes": _int("max_shapes", max_shapes, 1),
        "seed": _int("seed", seed, 0),
        "classes": list(classes),
        "min_visible": float(min_visible),
        "min_rel_size": float(min_rel_size),
        "max_rel_size": float(max_rel_size),
        "version": GENERATOR_VERSION,
    }
    if p["max_image_size"] is not None and p["max_image_size"] < p["image_size"]:
        raise ValueError(
            f"make_shapes: max_image_size ({p['max_image_size']}) must be >= image_size ({p['image_size']})"
        )
    if p["min_shapes"] > p["max_shapes"]:
        raise ValueError(f"make_shapes: min_shapes ({min_shapes}) must be <= max_shapes ({max_shapes})")
    unknown = [c for c in p["classes"] if c not in SHAPE_CLASSES]
    if not p["classes"] or unknown or len(set(p["classes"])) != len(p["classes"]):
        raise ValueError(
            f"make_shapes: classes must be distinct names from {SHAPE_CLASSES}, got {list(classes)!r}"
        )
    if not 0.0 < p["min_visible"] <= 1.0:
        raise ValueError(f"make_shapes: min_visible must be in (0, 1], got {min_visible!r}")
    if not 0.0 < p["min_rel_size"] <= p["max_rel_size"] <= 1.0:
        raise ValueError(
            "make_shapes: need 0 < min_rel_size <= max_rel_size <= 1, got "
            f"{min_rel_size!r}, {max_rel_size!r}"
        )
    return p


# ---------------------------------------------------------------------------------------- rendering
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured float32 ``[H, W, 3]`` background in [0, 255]."""
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    base = rng.uniform(30, 225, size=3).astype(np.float32)
    kind = rng.integers(5)
    if kind == 0:  # linear gradient between two colours
        other = rng.uniform(20, 235, size=3).astype(np.float32)
        theta = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == 1:  # stripes
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 40)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period)
        wave = np.sin(phase) if rng.random() < 0.5 else np.sign(np.sin(phase))
        amp = rng.uniform(10, 45, size=3).astype(np.float32)
        img = base + wave[..., None] * amp
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(8, 48))
        checker = (((xx // cell) + (yy // cell)) % 2)[..., None]
        other = np.clip(base + rng.uniform(-40, 40, size=3), 0, 255).astype(np.float32)
        img = base * (1 - checker) + other * checker
    elif kind == 3:  # smooth blobs: upsampled low-resolution noise
        lo = rng.standard_normal((int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.float32)
        blobs = cv2.resize(lo, (w, h), interpolation=cv2.INTER_CUBIC)
        img = base + blobs * rng.uniform(15, 40)
    else:  # flat colour with strong pixel noise
        img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
        img = img + rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(rng.uniform(8, 20))
    img = img + rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(1, 6))
    return np.clip(img, 0, 255, out=img)


def _regular_polygon(cx: float, cy: float, r: float, n: int, theta: float) -> np.ndarray:
    a = theta + np.arange(n) * (2 * np.pi / n)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def _shape_mask(name: str, h: int, w: int, cx: float, cy: float, size: float, theta: float,
                rng: np.random.Generator) -> np.ndarray:
    """Binary ``uint8 [H, W]`` mask of one shape of circumscribed diameter ``size``."""
    mask = np.zeros((h, w), dtype=np.uint8)
    r = size / 2.0
    scale = 1 << _SHIFT
    if name == "circle":
        cv2.circle(mask, (round(cx * scale), round(cy * scale)), round(r * scale), 1, -1, cv2.LINE_8, _SHIFT)
        return mask
    if name == "ellipse":
        axes = (round(r * scale), round(r * rng.uniform(0.35, 0.6) * scale))
        cv2.ellipse(mask, (round(cx * scale), round(cy * scale)), axes, float(np.degrees(theta)), 0, 360, 1, -1,
                    cv2.LINE_8, _SHIFT)
        return mask
    if name == "square":
        pts = _regular_polygon(cx, cy, r, 4, theta)
    elif name == "triangle":
        pts = _regular_polygon(cx, cy, r, 3, theta)
    elif name == "hexagon":
        pts = _regular_polygon(cx, cy, r, 6, theta)
    elif name == "star":
        outer = _regular_polygon(cx, cy, r, 5, theta)
        inner = _regular_polygon(cx, cy, r * 0.42, 5, theta + np.pi / 5)
        pts = np.stack([outer, inner], axis=1).reshape(-1, 2)
    else:  # pragma: no cover - guarded by _params
        raise ValueError(f"unknown shape {name!r}")
    cv2.fillPoly(mask, [np.round(pts * scale).astype(np.int32)], 1, cv2.LINE_8, _SHIFT)
    return mask


def _pick_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """A colour far from ``bg_mean`` (best of a few random draws)."""
    best, best_d = None, -1.0
    for _ in range(12):
        c = rng.uniform(0, 255, size=3)
        d = float(np.linalg.norm(c - bg_mean))
        if d > best_d:
            best, best_d = c, d
        if d >= 110:
            break
    assert best is not None
    return best.astype(np.float32)


def render_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    min_shapes: int = 1,
    max_shapes: int = 4,
    min_visible: float = 0.4,
    min_rel_size: float = 0.1,
    max_rel_size: float = 0.5,
    stats: list[dict[str, Any]] | None = None,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Renders one image.

    Args:
        rng: Source of all randomness.
        height: Image height.
        width: Image width.
        classes: Shape names; labels are ``1 + index`` in this sequence.
        min_shapes: Fewest shapes drawn (before occlusion filtering).
        max_shapes: Most shapes drawn.
        min_visible: A shape with a smaller visible fraction is removed.
        min_rel_size: Smallest shape diameter relative to the shorter side.
        max_rel_size: Largest shape diameter relative to the shorter side.
        stats: If a list is given, one dict per drawn shape is appended (drawing order) with
            ``label``, ``full_mask`` (the whole shape), ``visible_area``, ``full_area`` and ``kept``;
            for inspection and tests.

    Returns:
        ``(image, instances)``: ``uint8 [H, W, 3]`` RGB and a list of ``(label, visible mask)``
        with ``uint8 [H, W]`` masks, in drawing order (later ones occlude earlier ones; the
        visible masks are disjoint).
    """
    h, w = height, width
    bg = _background(rng, h, w)
    side = min(h, w)
    shapes = []
    for _ in range(int(rng.integers(min_shapes, max_shapes + 1))):
        k = int(rng.integers(len(classes)))
        size = rng.uniform(min_rel_size, max_rel_size) * side
        cx = rng.uniform(size / 2, w - size / 2)
        cy = rng.uniform(size / 2, h - size / 2)
        theta = rng.uniform(0, 2 * np.pi)
        mask = _shape_mask(classes[k], h, w, cx, cy, size, theta, rng)
        shade_dir = rng.uniform(0, 2 * np.pi)
        shade_amp = rng.uniform(0.0, 0.25)
        shapes.append({"label": k + 1, "mask": mask, "shade": (shade_dir, shade_amp)})
    shapes = [s for s in shapes if s["mask"].any()]
    # Drop hardly visible shapes, last to first: a shape's visibility only depends on later ones.
    kept: list[dict[str, Any]] = []
    cover = np.zeros((h, w), dtype=bool)
    for s in reversed(shapes):
        full = s["mask"].astype(bool)
        visible = full & ~cover
        s["kept"] = bool(visible.sum() >= min_visible * full.sum())
        s["visible_area"] = int(visible.sum())
        if s["kept"]:
            s["visible"] = visible
            kept.append(s)
            cover |= full
    kept.reverse()
    if stats is not None:
        stats.extend(
            {"label": s["label"], "full_mask": s["mask"], "visible_area": s["visible_area"],
             "full_area": int(s["mask"].sum()), "kept": s["kept"]}
            for s in shapes
        )
    img = bg
    for s in kept:
        full = s["mask"].astype(bool)
        ys, xs = np.nonzero(full)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        region = img[y0:y1, x0:x1]
        inside = full[y0:y1, x0:x1]
        colour = _pick_colour(rng, region[inside].mean(axis=0))
        d, amp = s["shade"]
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        shade = 1.0 + amp * ((xx * np.cos(d) + yy * np.sin(d)) / max(h, w) - 0.5)
        region[inside] = (colour * shade[..., None])[inside]
    img += rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(0.5, 4))
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, [(s["label"], s["visible"].astype(np.uint8)) for s in kept]


# ---------------------------------------------------------------------------------------- writing
def _write_split(
    out: Path, split: str, p: dict[str, Any], progress: Any
) -> dict[str, int]:
    img_dir = out / split
    sem_dir = out / "semantic" / split
    img_dir.mkdir(parents=True)
    sem_dir.mkdir(parents=True)
    images, annotations = [], []
    n = p["num_train"] if split == "train" else p["num_val"]
    for i in range(n):
        rng = np.random.default_rng([p["seed"], _SPLIT_CODES[split], i])
        if p["max_image_size"] is None:
            h = w = p["image_size"]
        else:
            h, w = (int(v) for v in rng.integers(p["image_size"], p["max_image_size"] + 1, size=2))
        image, instances = render_image(
            rng, h, w,
            classes=p["classes"],
            min_shapes=p["min_shapes"],
            max_shapes=p["max_shapes"],
            min_visible=p["min_visible"],
            min_rel_size=p["min_rel_size"],
            max_rel_size=p["max_rel_size"],
        )
        image_id = i + 1
        name = f"{image_id:06d}"
        Image.fromarray(image).save(img_dir / f"{name}.jpg", quality=95, subsampling=0)
        sem = np.zeros((h, w), dtype=np.uint8)
        for label, mask in instances:
            sem[mask > 0] = label
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
        Image.fromarray(sem).save(sem_dir / f"{name}.png", compress_level=1)
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": h, "width": w})
        if progress is not None:
            progress.update(1)
    coco = {
        "info": {"description": f"synthetic shapes ({split})", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(p["classes"])
        ],
    }
    (out / "annotations").mkdir(exist_ok=True)
    with open(out / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as f:
        json.dump(coco, f, separators=(",", ":"))
    return {"images": len(images), "annotations": len(annotations)}


def make_shapes(
    root: str | os.PathLike[str],
    *,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 256,
    max_image_size: int | None = None,
    min_shapes: int = 1,
    max_shapes: int = 4,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    min_visible: float = 0.4,
    min_rel_size: float = 0.1,
    max_rel_size: float = 0.5,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Generates the shapes dataset into ``root`` (layout in the module docstring).

    The data is written into a hidden temporary sibling folder (``.<name>.tmp-<random>``) and
    renamed to ``root`` only when complete, so an interrupted run never leaves a folder that looks
    like a finished dataset (a killed run may leave the hidden temporary folder behind).

    Args:
        root: Output folder; must not exist unless ``overwrite``.
        num_train: Training images (>= 1).
        num_val: Validation images (>= 1).
        image_size: Image side in pixels; with ``max_image_size``, the smallest side.
        max_image_size: If given, height and width are drawn per image uniformly in
            ``[image_size, max_image_size]``; otherwise images are ``image_size`` square.
        min_shapes: Fewest shapes drawn per image (before removing hidden ones; 0 allows empty
            images).
        max_shapes: Most shapes per image.
        seed: Seed; the same parameters give the same dataset.
        classes: Shape names from :data:`SHAPE_CLASSES`; category ids are ``1..K`` in this order.
        min_visible: Shapes with a smaller visible fraction are not drawn.
        min_rel_size: Smallest shape diameter relative to the shorter image side.
        max_rel_size: Largest shape diameter relative to the shorter image side.
        overwrite: Replace an existing ``root``.
        progress: Show a tqdm progress bar.

    Returns:
        ``root`` as a Path.

    Raises:
        ValueError: Invalid parameters.
        OutputExistsError: ``root`` exists and ``overwrite`` is false (a ValueError too).
    """
    p = _params(
        num_train=num_train, num_val=num_val, image_size=image_size, max_image_size=max_image_size,
        min_shapes=min_shapes, max_shapes=max_shapes, seed=seed, classes=classes,
        min_visible=min_visible, min_rel_size=min_rel_size, max_rel_size=max_rel_size,
    )
    root = Path(root)
    if root.exists() and not overwrite:
        raise OutputExistsError(
            f"make_shapes: {str(root)!r} already exists; choose another folder or pass overwrite=True"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    start = time.perf_counter()
    with progress_bar(total=p["num_train"] + p["num_val"], desc="shapes", unit="img", enabled=progress) as bar:
        try:
            counts = {split: _write_split(tmp, split, p, bar) for split in ("train", "val")}
            meta = {
                "generator": "resnet_det.data.shapes",
                "version": GENERATOR_VERSION,
                "params": p,
                "classes": list(p["classes"]),
                "splits": counts,
            }
            with open(tmp / "meta.json", "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            if root.exists():  # overwrite
                trash = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:12]}"
                os.rename(root, trash)
                os.rename(tmp, root)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                try:
                    os.rename(tmp, root)
                except OSError as e:  # another process created root meanwhile
                    if root.exists():
                        raise OutputExistsError(f"make_shapes: {str(root)!r} was created meanwhile") from e
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info(
        "wrote shapes dataset %s: %s in %.1f s", root,
        ", ".join(f"{k} {v['images']} images / {v['annotations']} instances" for k, v in counts.items()),
        time.perf_counter() - start,
    )
    return root


def default_cache_root() -> Path:
    """``$RESNET_DET_CACHE/shapes`` if the variable is set, else ``~/.cache/resnet_det/shapes``."""
    base = os.environ.get("RESNET_DET_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "resnet_det") / "shapes"


def ensure_shapes(cache_root: str | os.PathLike[str] | None = None, **params: Any) -> Path:
    """The cached shapes dataset for ``params`` (see :func:`make_shapes`), generated on first use.

    The folder is ``<cache_root>/shapes-<train>-<val>-<size>-s<seed>-<hash>``, the hash covering
    every parameter and :data:`GENERATOR_VERSION`. Generation shows a progress bar. If another
    process finishes the same folder first, its result is used.

    Args:
        cache_root: Cache folder; default :func:`default_cache_root`.
        **params: Keyword arguments of :func:`make_shapes` (not ``root``/``overwrite``/``progress``).

    Returns:
        The dataset folder.

    Raises:
        ValueError: Invalid parameters.
    """
    bad = {"root", "overwrite", "progress"} & set(params)
    if bad:
        raise ValueError(f"ensure_shapes: {sorted(bad)} cannot be passed (the cache chooses them)")
    defaults: dict[str, Any] = {
        "num_train": 1000, "num_val": 200, "image_size": 256, "max_image_size": None,
        "min_shapes": 1, "max_shapes": 4, "seed": 0, "classes": DEFAULT_CLASSES,
        "min_visible": 0.4, "min_rel_size": 0.1, "max_rel_size": 0.5,
    }
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"ensure_shapes: unknown parameters {sorted(unknown)}; known: {sorted(defaults)}")
    p = _params(**{**defaults, **params})
    key = hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(cache_root) if cache_root is not None else default_cache_root()
    folder = cache / f"shapes-{p['num_train']}-{p['num_val']}-{p['image_size']}-s{p['seed']}-{key}"
    meta_file = folder / "meta.json"
    if meta_file.is_file():
        return folder
    if folder.exists():
        raise ValueError(
            f"ensure_shapes: {str(folder)!r} exists but has no meta.json (not made by make_shapes); "
            "delete it so that it can be regenerated"
        )
    logger.info("generating the shapes dataset into %s (first use)", folder)
    try:
        make_shapes(folder, **{k: v for k, v in p.items() if k != "version"}, progress=True)
    except OutputExistsError:
        if not meta_file.is_file():  # pragma: no cover - a concurrent writer left something odd
            raise
    return folder


def shapes_paths(root: str | os.PathLike[str], split: str) -> dict[str, Path]:
    """Paths of one split of a shapes dataset, for :class:`~resnet_det.data.coco.CocoDetection`.

    Args:
        root: A folder written by :func:`make_shapes`.
        split: ``"train"`` or ``"val"``.

    Returns:
        ``{"image_root", "ann_file", "semantic_root"}``.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"shapes_paths: split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    return {
        "image_root": root / split,
        "ann_file": root / "annotations" / f"instances_{split}.json",
        "semantic_root": root / "semantic" / split,
    }

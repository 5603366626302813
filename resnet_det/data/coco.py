"""COCO-format detection / instance segmentation dataset with validation.

The annotation file is read once and validated into a compact columnar index
(:class:`~resnet_det.data.coco_index.CocoIndex`; the rules, what is fatal, skipped or repaired, are in
:mod:`resnet_det.data.coco_index`), optionally through the cache of :mod:`resnet_det.data.index_cache`, which
one process per machine writes and every other rank and later run reuses. Training targets come from that
index; :attr:`CocoDetection.coco` is a pycocotools ``COCO`` of the same cleaned ground truth, built on first
use (the evaluator's view: the training set never pays for it).

Images are opened only inside the image folder: ``file_name`` entries that are absolute or contain ``..``
are skipped at validation, and a file that resolves (through symbolic links) outside ``image_root`` is
refused without being opened, as an unreadable item.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from pycocotools.coco import COCO

from .coco_index import (
    BOX_CLIP_TOLERANCE,
    FIX_REASONS,
    SKIP_REASONS,
    CocoIndex,
    DatasetError,
    DatasetReport,
)
from .images import ImageLoadError, load_image, open_regular_file
from .index_cache import cached_index

logger = logging.getLogger(__name__)

__all__ = ["BOX_CLIP_TOLERANCE", "FIX_REASONS", "SKIP_REASONS", "UNREADABLE_KEY", "CocoDetection", "DatasetError",
           "DatasetReport", "record_unreadable"]

#: Target key of an item returned in place of unreadable ones: ``[(image id, message), ...]`` of the items this
#: process found unreadable just now. The loaders take it out in the main process (:func:`record_unreadable`),
#: so that the dataset's report counts what the worker processes skipped; models never see it.
UNREADABLE_KEY = "_unreadable"

_MAX_EXAMPLES = 3


class _BadItem(Exception):
    """Internal: an item cannot be loaded (unreadable image, size mismatch, missing PNG, path outside)."""


def _to_rle(segm: Any, h: int, w: int) -> dict[str, Any]:
    """Validated polygons (a list of coordinate arrays) or a compressed RLE as one compressed RLE."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    return segm


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

    **Unreadable items.** If an image cannot be read (missing/corrupt/truncated file, larger than
    Pillow's decompression-bomb limit, or resolving outside ``image_root``), its size on disk differs
    from the annotation file (checked on the header, before decoding), or its semantic PNG is
    missing/unreadable/of another size, a warning names the file (once per file and process), it is
    counted in :attr:`num_unreadable` and the dataset returns the next readable item (index + 1,
    wrapping) instead; a zero image is never returned. With DataLoader workers each process has its
    own count; the loaders of :mod:`resnet_det.data.build` gather the skipped images into :attr:`report`
    (``skipped["image_unreadable"]``) in the main process. Any ``OSError`` counts as unreadable (a symbolic
    link loop, a name too long, an I/O error), and a FIFO or a device at an image's path is refused without
    being opened (it would block). If no item is readable, :class:`DatasetError` is raised.

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
            :func:`resnet_det.data.transforms.build_transforms`. Tensors are made afterwards.
        contiguous_ids: Map category ids to ``1..K`` (sorted by id). ``False``: labels are the
            category ids themselves (torchvision's COCO checkpoints use 91 outputs this way).
        cache_dir: Folder of the cached index (:mod:`resnet_det.data.index_cache`; e.g.
            :func:`~resnet_det.data.index_cache.index_cache_dir`), or None to index the file in every
            process. Under a process group every rank must construct the dataset together.

    Attributes:
        report: What validation found (:class:`DatasetReport`), logged as one line when the dataset opens.
        index: The validated :class:`~resnet_det.data.coco_index.CocoIndex`.
        index_source: ``"built"`` (indexed by this process) or ``"cache"``.
        ids: The COCO image id of every item, in item order (ascending ids).

    Raises:
        DatasetError: On fatal problems (see :mod:`resnet_det.data.coco_index`) or inconsistent arguments.
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
        cache_dir: str | os.PathLike[str] | None = None,
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
        need_segm = with_masks or (with_semantic and semantic_root is None)
        index, self.index_source = cached_index(self.ann_file, need_segmentation=need_segm, cache_dir=cache_dir)
        self.index: CocoIndex = index
        report = DatasetReport.from_dict({**index.report.as_dict(), "ann_file": where})

        # Label maps.
        names = {c["id"]: c["name"] for c in index.categories}
        cat_ids = sorted(names)
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
        # category id -> label, vectorised: annotation category ids are all in ``cat_ids`` (validated)
        self._cat_ids = np.array(cat_ids, dtype=np.int64)
        self._cat_labels = np.array([self.cat_id_to_label[c] for c in cat_ids], dtype=np.int64)

        # Items: images with a non-crowd annotation (or all with keep_empty).
        n = index.num_images
        image_of = np.repeat(np.arange(n), np.diff(index.ann_start))
        with_instances = np.bincount(image_of[index.iscrowd == 0], minlength=n) > 0
        items = np.flatnonzero(with_instances | self.keep_empty)
        empty = np.flatnonzero(~with_instances) if not self.keep_empty else np.zeros(0, np.int64)
        if len(empty):
            for i in empty[:_MAX_EXAMPLES].tolist():
                report._example("image_without_annotations",
                                f"image id {int(index.image_id[i])} {index.file_name(i)!r}")
            report.skipped["image_without_annotations"] = len(empty)
        if not len(items):
            raise DatasetError(
                f"{where}: no usable image left after validation ({report.images_in_file} in the file; "
                f"skipped: {report.skipped or 'none'}). Fix the file, or pass keep_empty=True if all "
                "images are legitimately unannotated"
            )
        self._items = items
        self.ids: list[int] = index.image_id[items].tolist()

        report.num_categories = len(cat_ids)
        report.num_images = len(items)
        report.num_annotations = index.num_annotations
        report.num_crowd = int(np.count_nonzero(index.iscrowd))
        self.report = report
        (logger.warning if report.skipped else logger.info)("%s", report.summary())

        self._coco: COCO | None = None
        self._image_root_resolved: Path | None = None
        self.num_unreadable = 0
        self._unreadable: set[int] = set()

    # ------------------------------------------------------------------ public helpers
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def coco(self) -> COCO:
        """pycocotools' ``COCO`` of the cleaned ground truth (all valid images, crowd included), built on
        first use. Images keep ``id, file_name, height, width``; RLE counts are compressed strings."""
        if self._coco is None:
            coco = COCO()
            coco.dataset = self.index.to_coco_dict()
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_coco"] = None  # rebuilt on demand: workers never need it
        return state

    @property
    def num_labels(self) -> int:
        """Classifier outputs including background: ``num_classes + 1``, or ``max category id + 1``
        with ``contiguous_ids=False`` (91 for COCO)."""
        return len(self.class_names)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every item, from the annotation file (no image is opened)."""
        return (self.index.width[self._items] / self.index.height[self._items]).tolist()

    def image_info(self, index: int) -> dict[str, Any]:
        """The cleaned COCO ``images`` entry of item ``index``: ``id, file_name, height, width``."""
        i = int(self._items[index])
        return {"id": int(self.index.image_id[i]), "file_name": self.index.file_name(i),
                "height": int(self.index.height[i]), "width": int(self.index.width[i])}

    def image_path(self, index: int) -> Path:
        """The image file of item ``index``."""
        return self.image_root / self.image_info(index)["file_name"]

    # ------------------------------------------------------------------ loading
    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        n = len(self.ids)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        found: list[tuple[int, str]] = []
        for step in range(n):
            i = (index + step) % n
            if i in self._unreadable:
                continue
            try:
                image, target = self._load(i)
            except _BadItem as e:
                self._unreadable.add(i)
                self.num_unreadable = len(self._unreadable)
                found.append((int(self.ids[i]), str(e)))
                logger.warning("skipping unreadable item %d (image id %d): %s; returning the next one",
                               i, self.ids[i], e)
                continue
            if found:
                target[UNREADABLE_KEY] = found
            return image, target
        raise DatasetError(
            f"{self.ann_file}: none of the {n} images could be read (e.g. {self.image_path(index)}); "
            f"check image_root={str(self.image_root)!r}"
        )

    def record_unreadable(self, found: list[tuple[int, str]]) -> None:
        """Counts images a (worker) process found unreadable in :attr:`report`, once per image id."""
        seen = self.__dict__.setdefault("_reported_unreadable", set())
        for image_id, message in found:
            if image_id not in seen:
                seen.add(image_id)
                self.report.skip("image_unreadable", f"image id {image_id}: {message}")

    def _decode(self, segms: list[Any], h: int, w: int) -> np.ndarray:
        """Decodes polygon / RLE segmentations to ``uint8 [N, h, w]``."""
        if not segms:
            return np.zeros((0, h, w), dtype=np.uint8)
        rles = [_to_rle(s, h, w) for s in segms]
        with warnings.catch_warnings():  # pycocotools' Cython __array__ vs numpy 2 copy keyword
            warnings.simplefilter("ignore", DeprecationWarning)
            masks = mask_utils.decode(rles)  # [h, w, N], Fortran order
        return np.ascontiguousarray(masks.transpose(2, 0, 1), dtype=np.uint8)

    def _segmentation(self, a: int, h: int, w: int) -> Any:
        rle = self.index.rle(a, h, w)
        return rle if rle is not None else self.index.polygons(a)

    def _read_semantic(self, file_name: str, image_id: int, h: int, w: int) -> np.ndarray:
        assert self.semantic_root is not None
        path = self.semantic_root / (Path(file_name).stem + ".png")
        try:
            with open_regular_file(path) as f, Image.open(f) as im:
                im.load()
                if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                    raise DatasetError(
                        f"semantic PNG {str(path)!r} has mode {im.mode}; it must be a single-channel "
                        "label map (values = labels, 255 = ignore), not a colour image"
                    )
                sem = np.asarray(im).astype(np.int64)
        except DatasetError:
            raise
        except (OSError, SyntaxError, ValueError) as e:  # ImageLoadError (a ValueError) included
            raise _BadItem(f"semantic PNG {str(path)!r}: {e}") from e
        if sem.shape != (h, w):
            raise _BadItem(f"semantic PNG {str(path)!r} is {sem.shape[1]}x{sem.shape[0]}, image is {w}x{h}")
        bad = np.unique(sem[(sem >= self.num_labels) & (sem != 255) | (sem < 0)])
        if bad.size:
            raise DatasetError(
                f"semantic PNG {str(path)!r} (image id {image_id}) has values {bad[:10].tolist()} that "
                f"are not labels 0..{self.num_labels - 1} or 255 (ignore); the PNG must store dataset "
                "labels, check contiguous_ids"
            )
        return sem.astype(np.uint8)

    def _image_file(self, file_name: str) -> Path:
        """``image_root / file_name``, refused (without opening it) if it resolves outside ``image_root``."""
        path = self.image_root / file_name
        try:
            if self._image_root_resolved is None:
                self._image_root_resolved = self.image_root.resolve()
            real = path.resolve()
        except (OSError, RuntimeError) as e:  # a symbolic link loop (RuntimeError before Python 3.13), EIO, ...
            raise _BadItem(f"cannot load image {str(path)!r}: {type(e).__name__}: {e}") from e
        if not real.is_relative_to(self._image_root_resolved):
            raise _BadItem(
                f"{str(path)!r} resolves to {str(real)!r}, outside image_root {str(self._image_root_resolved)!r}; "
                "not opened. Put the file itself inside the image folder (a symbolic link must not lead out of it)"
            )
        return path

    def _load(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        ix = self.index
        i = int(self._items[index])
        img_id, h, w = int(ix.image_id[i]), int(ix.height[i]), int(ix.width[i])
        file_name = ix.file_name(i)
        path = self._image_file(file_name)
        try:
            image = load_image(path, expected_size=(h, w))
        except ImageLoadError as e:
            raise _BadItem(str(e)) from e
        if image.shape[:2] != (h, w):  # the header agreed, the decoded pixels do not (e.g. a broken EXIF block)
            raise _BadItem(f"{str(path)!r} is {image.shape[1]}x{image.shape[0]} on disk but {w}x{h} in "
                           f"{self.ann_file}; fix the annotation file (or the EXIF orientation of the image)")
        s, e = int(ix.ann_start[i]), int(ix.ann_start[i + 1])
        crowd = ix.iscrowd[s:e] != 0
        objs = np.flatnonzero(~crowd) + s
        boxes = ix.bbox[objs].astype(np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = self._cat_labels[np.searchsorted(self._cat_ids, ix.category_id[objs])]
        target: dict[str, Any] = {"boxes": boxes, "labels": labels}
        masks = None
        if self.with_masks or (self.with_semantic and self.semantic_root is None):
            masks = self._decode([self._segmentation(a, h, w) for a in objs.tolist()], h, w)
            if self.with_masks:
                target["masks"] = masks
        if self.with_semantic:
            if self.semantic_root is not None:
                target["sem_seg"] = self._read_semantic(file_name, img_id, h, w)
            else:
                assert masks is not None
                sem = np.zeros((h, w), dtype=np.uint8)
                crowd_segms = [self._segmentation(a, h, w) for a in (np.flatnonzero(crowd) + s).tolist()]
                sem[self._decode(crowd_segms, h, w).any(axis=0)] = 255
                areas = masks.reshape(len(objs), -1).sum(1)
                for k in np.argsort(-areas, kind="stable"):
                    sem[masks[k] > 0] = labels[k]
                target["sem_seg"] = sem
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        out: dict[str, Any] = {
            "boxes": torch.as_tensor(np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(target["labels"], dtype=np.int64)),
            "image_id": img_id,
            "orig_size": (h, w),
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


def record_unreadable(dataset: Any, targets: list[dict[str, Any]]) -> None:
    """Takes :data:`UNREADABLE_KEY` out of a batch's ``targets`` and counts it in ``dataset.report`` (main process)."""
    for target in targets:
        found = target.pop(UNREADABLE_KEY, None) if isinstance(target, dict) else None
        if found and callable(getattr(dataset, "record_unreadable", None)):
            dataset.record_unreadable(found)

"""COCO bbox / segm evaluation of model outputs: the converter and :class:`COCOEvaluator` (torch side).

The evaluation itself (ground truth, results files, the faster-coco-eval and pycocotools backends,
tables, plots, ``metrics.json``) is :mod:`resnet_det.evaluation.coco_core`, which needs no torch; its
public names are re-exported here. The numbers are pycocotools' (see that module for how the default
backend, faster-coco-eval, compares). Metrics are **fractions** in [0, 1]; the 12 summary metrics use
detectron2's names in pycocotools' order (``[metrics["bbox"][k] for k in METRIC_NAMES]`` *is*
``COCOeval.stats``); ``-1.0`` means "no ground truth in that setting"; per-category AP is
``AP-<category name>`` for every category with non-crowd ground truth among the evaluated images.

Distributed evaluation (world size > 1): every rank writes its results as a shard into the
evaluator's output folder, atomically (:func:`resnet_det_common.atomic_write`), and rank 0 reads the
shards one at a time and evaluates; rank 0's memory is that of the results (which it must hold to
evaluate them) plus one shard's text, whatever the number of ranks, and the other ranks never hold
more than their own share (``all_gather_object`` would give every rank a pickled copy of every rank's
results, padded to the largest). See :meth:`COCOEvaluator.evaluate`.

Warnings go through :func:`warnings.warn` with the category :class:`COCOEvalWarning` (a
``UserWarning``, shown by default). The tables go through ``logging`` (logger
``resnet_det.evaluation.coco``, INFO), so a run's console and ``log.txt`` get them; when INFO logging
is off (nothing set up) they are printed to stdout, as pycocotools prints them
(:func:`resnet_det_common.log_report`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util

from resnet_det_common import all_gather_object, atomic_write, barrier, get_rank, get_world_size, is_main_process
from resnet_det_common.io import writing

from .coco_core import (
    BACKENDS,
    DEFAULT_BACKEND,
    IOU_TYPES,
    MASK_THRESHOLD,
    METRIC_NAMES,
    METRICS_FILENAME,
    RESULTS_FILENAME,
    COCOEvalWarning,
    _category_names,
    _check_iou_types,
    _few,
    _gc_paused,
    _warn,
    default_backend,
    evaluate_prepared,
    evaluate_results_json,
    format_category_table,
    load_coco_gt,
    load_results_json,
    resolve_backend,
    set_default_backend,
)
from .evaluator import DatasetEvaluator

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "IOU_TYPES",
    "METRICS_FILENAME",
    "METRIC_NAMES",
    "RESULTS_FILENAME",
    "SHARDS_DIRNAME",
    "COCOEvalWarning",
    "COCOEvaluator",
    "default_backend",
    "encode_masks",
    "evaluate_results_json",
    "format_category_table",
    "instances_to_coco_json",
    "load_coco_gt",
    "load_results_json",
    "resolve_backend",
    "set_default_backend",
]

SHARDS_DIRNAME = "shards"
"""The folder of the output folder where the ranks of a distributed evaluation write their shards."""


# ----------------------------------------------------------------------------------------------------
# Model outputs -> COCO results
# ----------------------------------------------------------------------------------------------------


def encode_masks(masks: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
    """Encodes binary masks as COCO compressed RLE.

    Args:
        masks: ``[N, H, W]`` or ``[N, 1, H, W]``. Floating point: probabilities, foreground where
            ``> 0.5``; bool or integer: foreground where non-zero.

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": str}`` (column-major RLE as pycocotools encodes it,
        ``counts`` decoded to ``str`` so that the list is JSON-serialisable).

    Raises:
        ValueError: ``masks`` has another shape.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu()
        if masks.dtype == torch.bfloat16:
            masks = masks.float()
        masks = masks.numpy()
    masks = np.asarray(masks)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(
            f"masks must have shape [N, H, W] or [N, 1, H, W], got {list(masks.shape)}"
        )
    if masks.shape[0] == 0:
        return []
    binary = masks > MASK_THRESHOLD if np.issubdtype(masks.dtype, np.floating) else masks != 0
    # pycocotools wants an [H, W, N] uint8 array in Fortran (column-major) order.
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    out = []
    for rle in rles:
        counts = rle["counts"]
        out.append({"size": [int(s) for s in rle["size"]],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts})
    return out


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a single integer, got a tensor of shape {list(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def instances_to_coco_json(
    image_id: int,
    output: Mapping[str, Any],
    label_to_cat_id: Mapping[int, int] | None = None,
    *,
    iou_types: Iterable[str] | None = None,
    image_size: tuple[int, int] | None = None,
    cat_ids: Collection[int] | None = None,
) -> list[dict[str, Any]]:
    """Converts one image's detections (torchvision convention) to COCO result dicts.

    The one converter of this project: :class:`COCOEvaluator` uses it, and so does anything that
    writes a COCO results JSON. Boxes go from ``xyxy`` to ``xywh`` (absolute pixels), labels through
    ``label_to_cat_id``, and masks to compressed RLE (floating-point masks are foreground where
    ``> 0.5``, torchvision's rule; bool/integer masks where non-zero).

    Example::

        >>> out = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "scores": torch.tensor([0.5]),
        ...        "labels": torch.tensor([2])}
        >>> instances_to_coco_json(5, out, {1: 10, 2: 20})
        [{'image_id': 5, 'category_id': 20, 'score': 0.5, 'bbox': [1.0, 2.0, 10.0, 20.0]}]

    Args:
        image_id: The COCO image id of these detections.
        output: ``scores`` ``[N]``, ``labels`` ``[N]`` (integers), ``boxes`` ``[N, 4]`` xyxy in the
            original image's pixels and/or ``masks`` ``[N, 1, H, W]`` probabilities or
            ``[N, H, W]`` bool/uint8 at the original image size. Tensors may live on any device.
        label_to_cat_id: Contiguous model label -> COCO category id; ``None``: the labels already
            are category ids.
        iou_types: What to convert: ``"bbox"`` (adds ``bbox``) and/or ``"segm"`` (adds
            ``segmentation``). ``None``: bbox if ``output`` has ``boxes``, segm if it has ``masks``.
        image_size: ``(height, width)`` of the image; when given, masks must have that size.
        cat_ids: The valid category ids; when given (and no ``label_to_cat_id``), labels outside
            them are refused.

    Returns:
        One dict per detection: ``{"image_id", "category_id", "score", "bbox": [x, y, w, h],
        "segmentation": {"size": [H, W], "counts": str}}`` (the keys the iou types ask for),
        JSON-serialisable.

    Raises:
        ValueError: A key is missing, shapes or lengths disagree, labels are not integers, a label
            has no category, a box or score is NaN/inf, a box has x2 < x1 or y2 < y1 (xywh passed
            as xyxy), or a mask does not have the image's size. The message names the image.
    """
    image_id = _as_int(image_id, "image id")
    where = f"outputs for image {image_id}"
    if not isinstance(output, Mapping):
        raise ValueError(f"{where}: expected a dict with boxes/scores/labels, got {type(output).__name__}")
    if iou_types is None:
        types = tuple(t for t, key in (("bbox", "boxes"), ("segm", "masks")) if key in output)
        if not types:
            raise ValueError(f"{where} have neither 'boxes' nor 'masks' (keys: {sorted(output)}); "
                             "there is nothing to convert to COCO results")
    else:
        types = _check_iou_types(iou_types)

    def get(key: str) -> torch.Tensor:
        if key not in output:
            raise ValueError(f"{where} have no '{key}' (keys: {sorted(output)}); COCO "
                             f"{'/'.join(types)} results need it")
        value = output[key]
        if isinstance(value, torch.Tensor):
            return value.detach().cpu()
        return torch.as_tensor(np.asarray(value))

    scores = get("scores").reshape(-1)
    n = scores.numel()
    labels = get("labels").reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"{where}: {labels.numel()} labels for {n} scores")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{where}: labels must be an integer tensor, got {labels.dtype}")
    scores = scores.double()
    if not torch.isfinite(scores).all():
        raise ValueError(f"{where}: scores contain NaN or inf; the model produced invalid scores")
    if n == 0:
        return []

    if label_to_cat_id is not None:
        unmapped = sorted({int(v) for v in labels.tolist()} - set(label_to_cat_id))
        if unmapped:
            raise ValueError(
                f"{where}: labels {_few(unmapped)} are not keys of label_to_cat_id "
                f"(keys {min(label_to_cat_id, default=None)}..{max(label_to_cat_id, default=None)})"
            )
        categories = [int(label_to_cat_id[int(v)]) for v in labels.tolist()]
    else:
        categories = [int(v) for v in labels.tolist()]
        if cat_ids is not None:
            bad = [c for c in categories if c not in cat_ids]
            if bad:
                raise ValueError(
                    f"{where}: category ids {_few(bad)} are not in the annotations' categories "
                    f"{_few(cat_ids)}; if the model predicts contiguous labels 1..K pass label_to_cat_id"
                )

    results = [{"image_id": image_id, "category_id": c, "score": float(s)}
               for c, s in zip(categories, scores.tolist())]
    if "bbox" in types:
        boxes = get("boxes")
        if boxes.dim() != 2 or boxes.shape != (n, 4):
            raise ValueError(f"{where}: boxes have shape {list(boxes.shape)}, expected [{n}, 4] (xyxy)")
        boxes = boxes.double()
        if not torch.isfinite(boxes).all():
            raise ValueError(f"{where}: boxes contain NaN or inf; the model produced invalid boxes")
        wh = boxes[:, 2:] - boxes[:, :2]
        if (wh < 0).any():
            raise ValueError(
                f"{where}: boxes with x2 < x1 or y2 < y1; boxes must be xyxy (x1, y1, x2, y2) in "
                "pixels of the original image (xywh boxes passed as xyxy look like this)"
            )
        for r, b in zip(results, torch.cat([boxes[:, :2], wh], dim=1).tolist()):
            r["bbox"] = b
    if "segm" in types:
        raw = output.get("masks")
        if raw is None:
            get("masks")  # raises: no masks
        if isinstance(raw, torch.Tensor) and raw.is_floating_point():
            raw = raw.detach() > MASK_THRESHOLD  # binarise on the device: copy 1/4 of the bytes
        masks = raw.cpu() if isinstance(raw, torch.Tensor) else torch.as_tensor(np.asarray(raw))
        shape = list(masks.shape)
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        size_ok = image_size is None or tuple(masks.shape[1:]) == tuple(image_size)
        if masks.dim() != 3 or masks.shape[0] != n or not size_ok:
            h, w = image_size if image_size is not None else ("H", "W")
            raise ValueError(
                f"{where}: masks have shape {shape}, expected [{n}, 1, {h}, {w}] or [{n}, {h}, {w}] "
                "(masks pasted at the original image size)"
            )
        for r, rle in zip(results, encode_masks(masks)):
            r["segmentation"] = rle
    return results



# ----------------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------------


class COCOEvaluator(DatasetEvaluator):
    """Accumulates model outputs and evaluates them with COCO's metrics (bbox and/or segm).

    A :class:`~resnet_det.evaluation.DatasetEvaluator`; typical use (one evaluator per validation
    set; ``reset()`` before each evaluation, or let :func:`~resnet_det.evaluation.inference_on_dataset`
    drive it)::

        evaluator = COCOEvaluator(val_set.coco, iou_types=("bbox", "segm"),
                                  label_to_cat_id=val_set.label_to_cat_id, output_dir="out/eval")
        evaluator.reset()
        for images, targets in loader:
            evaluator.process(targets, model(images))   # targets[i]["image_id"]
        metrics = evaluator.evaluate()   # {"bbox": {"AP": 0.37, ...}, "segm": {...}}

    Distributed: when ``torch.distributed`` is initialised (world size > 1), **every rank must call
    ``evaluate()``** (it is a collective). Each rank processes its own share of the images and writes
    it as a shard (``<output_dir>/shards/<token>/rank<r>.json``, atomically); after a barrier rank 0
    reads the shards in rank order, de-duplicates them by image id (a padding sampler such as
    ``DistributedSampler`` repeats images; the first copy is kept), deletes them, computes, logs and
    writes the outputs and returns the metrics; the other ranks return ``{}``. The output folder must
    be one that rank 0 can read (the run's output folder, on a filesystem the machines share); without
    ``output_dir`` the shards go to a temporary folder of rank 0's machine, which serves one machine
    only. The only collectives are a short token (``all_gather_object`` of a few bytes) and a barrier.
    With NCCL, call ``torch.cuda.set_device(local_rank)`` first (as every DDP script does).

    The evaluation covers exactly the images given to ``process()`` (detectron2's rule: an image
    processed with no detections counts, an image never processed does not); a
    :class:`COCOEvalWarning` says when that is a strict subset of the annotations' images.
    If nothing was processed at all, all the annotations' images are evaluated with no detections.

    Metrics are fractions in [0, 1]; see the module docstring for keys, -1 and per-category AP.

    Attributes:
        coco_gt: The private (validated, possibly repaired) ground-truth ``COCO`` object of the backend.
        iou_types: The evaluated iou types.
        backend: The backend that evaluates (``"faster-coco-eval"`` or ``"pycocotools"``).
        stats: After ``evaluate()`` on rank 0: ``{iou_type: the 12 raw COCOeval.stats}``.
        coco_eval: After ``evaluate()`` on rank 0: ``{iou_type: the COCOeval object}``.
        timings: After ``evaluate()`` on rank 0: seconds of the gather / shard stage.
    """

    def __init__(
        self,
        coco_gt: Any,
        *,
        iou_types: Iterable[str] = ("bbox",),
        label_to_cat_id: Mapping[int, int] | None = None,
        output_dir: str | Path | None = None,
        class_names: Mapping[int, str] | Sequence[str] | None = None,
        backend: str | None = None,
        progress: bool = True,
    ) -> None:
        """Creates the evaluator.

        Args:
            coco_gt: Ground truth: a ``COCO`` of pycocotools or faster-coco-eval (copied, never modified)
                or the path to an instances JSON file.
            iou_types: ``"bbox"`` and/or ``"segm"``.
            label_to_cat_id: Contiguous model label -> COCO category id. ``None``: the model's labels
                already are COCO category ids.
            output_dir: Where to write ``coco_instances_results.json``, ``metrics.json`` and
                ``pr_curve_<iou_type>.png`` (rank 0 only), and the shards of a distributed evaluation;
                ``None`` writes nothing (shards then go to a temporary folder).
            class_names: Category names for the per-category metrics (default: the annotations'
                names): a dict ``{category_id: name}``; or a list of one name per category in
                ascending category-id order; or a list indexed by model label with ``[0]`` =
                background (``dataset.class_names``; needs ``label_to_cat_id``); or, without
                ``label_to_cat_id``, a list indexed by category id (torchvision's 91 COCO names).
            backend: ``"faster-coco-eval"`` or ``"pycocotools"``; ``None``: :func:`default_backend`.
                Resolved now (:func:`resolve_backend`: pycocotools if faster-coco-eval is missing).
            progress: Allow the evaluation's progress bar (shown only when stderr is a terminal).

        Raises:
            ValueError: Unknown iou type or backend, unusable ground truth, or a ``label_to_cat_id`` /
                ``class_names`` that does not fit the annotations' categories.
        """
        self.iou_types = _check_iou_types(iou_types)
        self.backend = resolve_backend(backend)
        self.coco_gt = load_coco_gt(coco_gt, iou_types=self.iou_types, backend=self.backend)
        self._img_sizes = {
            int(i): (img.get("height"), img.get("width")) for i, img in self.coco_gt.imgs.items()
        }
        self._cat_ids = set(self.coco_gt.getCatIds())
        if label_to_cat_id is not None:
            mapping = {_as_int(k, "label_to_cat_id key"): _as_int(v, "label_to_cat_id value")
                       for k, v in dict(label_to_cat_id).items()}
            bad = [v for v in mapping.values() if v not in self._cat_ids]
            if bad:
                raise ValueError(
                    f"label_to_cat_id maps to category ids {_few(bad)} that are not in the annotations' "
                    f"categories {_few(self._cat_ids)}"
                )
            self.label_to_cat_id: dict[int, int] | None = mapping
        else:
            self.label_to_cat_id = None
        self.category_names = _category_names(self.coco_gt, class_names, self.label_to_cat_id)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.progress = progress
        self.stats: dict[str, list[float]] = {}
        self.coco_eval: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        """Forgets everything processed so far (call before each evaluation)."""
        self._predictions: dict[int, list[dict[str, Any]]] = {}

    def process(
        self,
        inputs: Sequence[Mapping[str, Any]] | Sequence[int] | torch.Tensor,
        outputs: Sequence[Mapping[str, Any]],
    ) -> None:
        """Converts one batch of model outputs to COCO results and stores them.

        Args:
            inputs: The batch's targets (dicts with the COCO ``image_id``), or directly the image
                ids (a list or a tensor), one per output.
            outputs: torchvision-style dicts, one per image: ``boxes`` ``[N, 4]`` xyxy in original
                image pixels, ``scores`` ``[N]``, ``labels`` ``[N]`` (contiguous labels if
                ``label_to_cat_id`` was given, else COCO category ids) and, for segm, ``masks``
                ``[N, 1, H, W]`` probabilities or ``[N, H, W]`` bool/uint8 at the original image size.
                Tensors may live on any device.

        Raises:
            ValueError: Lengths differ, a target has no ``image_id``, an image id or category is not
                in the annotations, a key is missing, shapes disagree, a box or score is NaN/inf, a
                box has x2 < x1 or y2 < y1, or a mask does not have the image's size. The message
                names the image.
        """
        if isinstance(inputs, torch.Tensor):
            image_ids: list[Any] = inputs.reshape(-1).tolist()
        else:
            image_ids = []
            for i, item in enumerate(inputs):
                if isinstance(item, Mapping):
                    if "image_id" not in item:
                        raise ValueError(f"process(): inputs[{i}] has no 'image_id' (keys: {sorted(item)}); "
                                         "pass the dataset's targets or the COCO image ids")
                    item = item["image_id"]
                image_ids.append(item)
        if len(image_ids) != len(outputs):
            raise ValueError(f"process() got {len(image_ids)} image ids but {len(outputs)} outputs; "
                             "pass one image id per output dict")
        ids = [_as_int(i, "image id") for i in image_ids]
        unknown = [i for i in ids if i not in self._img_sizes]
        if unknown:
            raise ValueError(
                f"process() got image ids {_few(unknown)} that are not in the annotations' images "
                f"({len(self._img_sizes)} images, e.g. {_few(self._img_sizes)}); pass the dataset's "
                "COCO image ids (target['image_id']), not batch indices"
            )
        converted = [
            instances_to_coco_json(img_id, out, self.label_to_cat_id, iou_types=self.iou_types,
                                   image_size=self._img_sizes[img_id], cat_ids=self._cat_ids)
            for img_id, out in zip(ids, outputs)
        ]
        for img_id, results in zip(ids, converted):
            self._predictions.setdefault(img_id, results)  # an image seen twice keeps its first results

    # -- distributed: shards in the output folder ------------------------------------------------------
    def _shard_folder(self) -> tuple[Path, bool]:
        """This evaluation's shard folder (the same on every rank) and whether it is a temporary one."""
        mine = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}" if is_main_process() else None
        token = all_gather_object(mine)[0]  # rank 0's: a few bytes, the one collective besides the barrier
        if self.output_dir is not None:
            return self.output_dir / SHARDS_DIRNAME / token, False
        return Path(tempfile.gettempdir()) / f"resnet_det_eval_shards-{token}", True

    def _gather(self) -> dict[int, list[dict[str, Any]]] | None:
        """All ranks' predictions on rank 0 (None on the other ranks), de-duplicated by image id."""
        if get_world_size() == 1:
            return dict(self._predictions)
        folder, temporary = self._shard_folder()
        rank, world = get_rank(), get_world_size()
        payload = {"rank": rank, "world_size": world, "images": [[i, r] for i, r in self._predictions.items()]}
        with writing(folder / f"rank{rank:05d}.json", "evaluation shard"):  # a full disk: one line naming it
            atomic_write(folder / f"rank{rank:05d}.json", json.dumps(payload))
        del payload
        barrier()
        if not is_main_process():
            return None
        merged: dict[int, list[dict[str, Any]]] = {}
        try:
            for r in range(world):
                path = folder / f"rank{r:05d}.json"
                if not path.is_file():
                    where = "a temporary folder of rank 0's machine (no output_dir)" if temporary else str(folder)
                    raise RuntimeError(
                        f"COCOEvaluator: the shard of rank {r} is not in {where} after the barrier; the shard "
                        "folder must be readable by rank 0: give output_dir on a filesystem that every rank shares"
                    )
                with path.open("rb") as f, _gc_paused():  # one shard's text at a time on rank 0
                    shard = json.load(f)
                for img_id, results in shard["images"]:
                    merged.setdefault(int(img_id), results)
                del shard
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            if not temporary:
                with_parent = folder.parent
                if with_parent.is_dir() and not any(with_parent.iterdir()):
                    with_parent.rmdir()
        return merged

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Evaluates everything processed since the last ``reset()``.

        Returns:
            ``{iou_type: {"AP": ..., "AP50": ..., ..., "ARl": ..., "AP-<category>": ...}}`` as
            fractions (``-1.0`` where pycocotools gives -1), on rank 0 / without distributed;
            ``{}`` on the other ranks of an initialised process group.

        Raises:
            RuntimeError: Distributed: rank 0 cannot read another rank's shard (see the class docstring).
        """
        t0 = time.perf_counter()
        distributed = get_world_size() > 1
        predictions = self._gather()
        if predictions is None:
            return {}
        timings = {"gather": time.perf_counter() - t0}
        all_ids = sorted(self._img_sizes)
        if not predictions:
            _warn(f"COCOEvaluator: no image was processed; evaluating all {len(all_ids)} images of the "
                  "annotations with no detections (AP = 0)")
            img_ids = all_ids
        else:
            img_ids = sorted(predictions)
            if len(img_ids) < len(all_ids):
                _warn(f"COCOEvaluator: evaluating {len(img_ids)} of the {len(all_ids)} images of the "
                      "annotations (only the images given to process()); these metrics are not "
                      "comparable with full-set numbers")
        results = [r for i in img_ids for r in predictions.get(i, ())]
        processed = bool(predictions)
        del predictions
        if processed and not results:
            _warn(f"COCOEvaluator: no detections on any of the {len(img_ids)} evaluated images; "
                  "AP and AR are 0 (-1 where a setting has no ground truth)")
        if self.output_dir is not None:
            with writing(self.output_dir / RESULTS_FILENAME, "evaluation file"):
                atomic_write(self.output_dir / RESULTS_FILENAME, json.dumps(results), durable=False)
        image_id = np.fromiter((r["image_id"] for r in results), dtype=np.int64, count=len(results))
        metrics, evals = evaluate_prepared(
            self.coco_gt, results, image_id, self.iou_types, img_ids=img_ids, names=self.category_names,
            output_dir=self.output_dir, backend=self.backend, timings=timings, progress=self.progress,
            in_place=distributed,  # results read from the shards are this call's own; process()'s are kept
        )
        self.coco_eval = evals
        self.stats = {t: [float(s) for s in e.stats[:len(METRIC_NAMES)]] for t, e in evals.items()}
        self.timings = timings
        return metrics

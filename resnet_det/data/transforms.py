"""Detection augmentation on numpy data, through albumentations.

A transform is a callable ``(image, target) -> (image, target)`` on numpy data:

* ``image``: ``uint8 [H, W, 3]`` RGB.
* ``target["boxes"]``: ``float32 [K, 4]``, xyxy in absolute pixels (albumentations' ``pascal_voc``).
* ``target["labels"]``: ``int64 [K]``.
* ``target["masks"]`` (optional): ``uint8 [K, H, W]`` instance masks.
* ``target["sem_seg"]`` (optional): ``uint8 [H, W]`` label map (255 = ignore).

Other target keys pass through unchanged. Boxes go through albumentations with
``BboxParams(format="pascal_voc", label_fields=["labels", "idx"])``; ``idx`` (each box's row)
tells which instances albumentations kept, so masks (passed as ``masks=``, which albumentations
never filters) and labels stay aligned with boxes. ``sem_seg`` goes through ``mask=``. (On
albumentations 1.x, whose ``masks=`` path uses the image interpolation in some releases, each
instance mask is passed as an extra ``"mask"`` target instead: see :data:`MASKS_AS_MASK_TARGETS`.)

**Randomness and seeding.** Every random decision (flip, scale, crop offset, colour jitter seed) is
drawn from the :class:`DetectionTransforms` object's own ``numpy.random.Generator``; the
albumentations operations themselves are deterministic once their parameters are drawn, except
the colour jitter, which is seeded from that generator on every call (``Compose.set_random_seed``
on albumentations >= 2, a saved-and-restored ``random``/``numpy`` global seed on 1.x). So results
do not depend on the albumentations version's seeding scheme nor on global RNG state:

* ``build_transforms(..., seed=s)`` gives a reproducible stream of augmentations;
* ``transforms.set_seed(s)`` restarts the stream; the train loader of :mod:`resnet_det.data.build`
  calls it before every sample with a seed derived from (seed, rank, batch number, slot), so
  augmentations are independent of the number of workers and are reproduced exactly on resume;
* when used in a plain DataLoader worker without ``set_seed``, the generator is re-seeded once per
  process from ``(seed, torch.initial_seed())``, so workers do not repeat each other.

**Boxes after crops.** :class:`LargeScaleJitter` crops; boxes are clipped to the crop by
albumentations, and when masks are present boxes are recomputed from the cropped masks (as
detectron2's ``recompute_boxes`` does for LSJ), so each box is the bounding box of its mask. After
a crop, instances whose box is narrower or lower than ``min_box_size`` (1 px) are removed together
with their label and mask (a DEBUG log line counts them). Flip and resize never remove instances.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check in every worker
import albumentations as A
import cv2
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DetectionTransforms",
    "LargeScaleJitter",
    "Photometric",
    "RandomHorizontalFlip",
    "ShorterSideResize",
    "boxes_from_masks",
    "build_transforms",
    "shorter_side_size",
]

Target = dict[str, Any]


def shorter_side_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Output size of the shorter-side resize rule (torchvision / detectron2).

    The image is scaled so that its shorter side becomes ``min_size``, unless its longer side would
    then exceed ``max_size``, in which case it is scaled so that the longer side is ``max_size``.
    Aspect ratio is kept. The arithmetic and rounding are detectron2's ``ResizeShortestEdge``:
    sizes are rounded to the nearest integer (``int(x + 0.5)``), so the shorter side is exactly
    ``min_size`` when the cap does not apply. (torchvision's ``GeneralizedRCNNTransform`` applies
    the same scale but floors the size, which can give 1 px less.)

    Args:
        h: Input height in pixels (> 0).
        w: Input width in pixels (> 0).
        min_size: Target shorter side (> 0).
        max_size: Cap on the longer side (>= ``min_size`` is typical but not required; > 0).

    Returns:
        ``(new_h, new_w)``, each at least 1.

    Raises:
        ValueError: A size is not a positive integer.
    """
    for name, v in (("h", h), ("w", w), ("min_size", min_size), ("max_size", max_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"shorter_side_size: {name} must be a positive integer, got {v!r}")
    size = float(min_size)
    scale = size / min(h, w)
    if h < w:
        newh, neww = size, scale * w
    else:
        newh, neww = scale * h, size
    if max(newh, neww) > max_size:
        scale = float(max_size) / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return max(int(newh + 0.5), 1), max(int(neww + 0.5), 1)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight boxes around binary masks.

    Args:
        masks: ``[K, H, W]`` array, non-zero = inside.

    Returns:
        ``float32 [K, 4]`` xyxy in pixel-edge coordinates: a mask covering columns ``x0..x1``
        (inclusive) gives ``x0, x1 + 1``. An empty mask gives ``[0, 0, 0, 0]``.
    """
    k = masks.shape[0]
    out = np.zeros((k, 4), dtype=np.float32)
    if k == 0:
        return out
    rows = masks.any(axis=2)  # [K, H]
    cols = masks.any(axis=1)  # [K, W]
    nonempty = rows.any(axis=1)
    h, w = masks.shape[1:]
    out[:, 0] = cols.argmax(axis=1)
    out[:, 1] = rows.argmax(axis=1)
    out[:, 2] = w - cols[:, ::-1].argmax(axis=1)
    out[:, 3] = h - rows[:, ::-1].argmax(axis=1)
    out[~nonempty] = 0
    return out


def _check_sample(image: np.ndarray, target: Target) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"transforms expect a uint8 [H, W, 3] numpy image, got {desc}")
    boxes = np.asarray(target.get("boxes", np.zeros((0, 4))))
    labels = np.asarray(target.get("labels", np.zeros(0)))
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(labels) != len(boxes):
        raise ValueError(
            f"target boxes must be [K, 4] with K labels; got boxes {boxes.shape}, labels {labels.shape}"
        )
    if "masks" in target and np.asarray(target["masks"]).shape != (len(boxes), *image.shape[:2]):
        raise ValueError(
            f"target masks must be [K, H, W] = {(len(boxes), *image.shape[:2])}, "
            f"got {np.asarray(target['masks']).shape}"
        )
    if "sem_seg" in target and np.asarray(target["sem_seg"]).shape != image.shape[:2]:
        raise ValueError(f"target sem_seg must be [H, W] = {image.shape[:2]}, got {target['sem_seg'].shape}")


#: albumentations 1.x resizes ``masks=`` with the *image* interpolation (bilinear) in several
#: releases (e.g. 1.4.2x), unlike ``mask=`` (nearest). There, each instance mask is passed as an
#: extra target of type "mask" instead, so instance masks and sem_seg are always resampled alike.
MASKS_AS_MASK_TARGETS: bool = int(A.__version__.split(".")[0]) < 2


class _AlbuPipeline:
    """Deterministic albumentations ``ops`` applied to image, boxes, masks and sem_seg together.

    The ``A.Compose`` is built once per pipeline (per dataset transform, per worker process), not per
    sample: building one costs about as much as a flip itself. Ops whose parameters change per
    sample (resize size, crop window) are updated in place before each call by the owning
    transform; the pipeline is private to that transform, so nothing else sees the change.
    """

    def __init__(self, *ops: A.BasicTransform) -> None:
        self.ops = list(ops)
        # One Compose per set of additional targets: always one on albumentations >= 2; on 1.x the
        # instance masks are extra "mask" targets, whose number varies with the instance count.
        self._composes: dict[int, A.Compose] = {}

    def _compose(self, num_extra: int) -> A.Compose:
        compose = self._composes.get(num_extra)
        if compose is None:
            extra = {f"instance_mask_{i}": "mask" for i in range(num_extra)}
            compose = A.Compose(
                self.ops,
                bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "idx"]),
                additional_targets=extra or None,
            )
            self._composes[num_extra] = compose
        return compose

    def __call__(self, image: np.ndarray, target: Target) -> tuple[np.ndarray, Target]:
        boxes = np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(target["labels"], dtype=np.int64)
        k = len(boxes)
        data: dict[str, Any] = {
            "image": image,
            "bboxes": boxes.tolist(),
            "labels": labels.tolist(),
            "idx": list(range(k)),
        }
        masks = target.get("masks")
        extra: list[str] = []
        if masks is not None and k > 0:
            if MASKS_AS_MASK_TARGETS:
                extra = [f"instance_mask_{i}" for i in range(k)]
                data.update(zip(extra, np.asarray(masks)))
            else:
                data["masks"] = list(np.asarray(masks))
        if target.get("sem_seg") is not None:
            data["mask"] = np.asarray(target["sem_seg"])
        out = self._compose(len(extra))(**data)
        new_image = out["image"]
        h, w = new_image.shape[:2]
        keep = np.asarray(out["idx"], dtype=np.int64).reshape(-1)
        result = dict(target)
        result["boxes"] = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        result["labels"] = labels[keep]
        if masks is not None:
            if k > 0:
                outs = [out[name] for name in extra] if extra else out["masks"]
                all_masks = np.stack([np.asarray(m, dtype=np.uint8) for m in outs])
                result["masks"] = np.ascontiguousarray(all_masks[keep])
            else:
                result["masks"] = np.zeros((0, h, w), dtype=np.uint8)
        if "mask" in data:
            result["sem_seg"] = np.ascontiguousarray(out["mask"])
        return new_image, result


def _resize_op() -> A.Resize:
    return A.Resize(1, 1, interpolation=cv2.INTER_LINEAR)


def _set_resize(op: A.Resize, height: int, width: int) -> None:
    op.height, op.width = height, width


def _filter_small(target: Target, min_box_size: float) -> tuple[Target, int]:
    boxes = target["boxes"]
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_box_size)
    removed = int((~keep).sum())
    if removed:
        target = dict(target)
        target["boxes"] = boxes[keep]
        target["labels"] = np.asarray(target["labels"])[keep]
        if "masks" in target:
            target["masks"] = np.ascontiguousarray(target["masks"][keep])
    return target, removed


class RandomHorizontalFlip:
    """Mirrors image, boxes, masks and sem_seg left-right with probability ``p``.

    A box ``[x0, y0, x1, y1]`` becomes ``[W - x1, y0, W - x0, y1]``; mask column ``j`` becomes
    ``W - 1 - j`` (consistent with pixel-edge box coordinates).
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p!r}")
        self.p = p
        self._flip = _AlbuPipeline(A.HorizontalFlip(p=1.0))

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[np.ndarray, Target]:
        if self.p > 0 and rng.random() < self.p:
            return self._flip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ShorterSideResize:
    """Shorter-side resize (:func:`shorter_side_size`), single- or multi-scale.

    A function wrapper around ``albumentations.Resize``: the output size is computed here, so the
    rule and rounding are exactly :func:`shorter_side_size`'s on every albumentations version.
    Images use bilinear interpolation, masks and sem_seg nearest.

    Args:
        min_size: Shorter side, or a tuple of candidates of which one is drawn uniformly per image.
        max_size: Cap on the longer side.
    """

    def __init__(self, min_size: int | Sequence[int], max_size: int = 1333) -> None:
        sizes = (min_size,) if isinstance(min_size, (int, np.integer)) else tuple(min_size)
        if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0 for s in sizes):
            raise ValueError(f"ShorterSideResize: min_size must be a positive int or a tuple of them, got {min_size!r}")
        if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size <= 0:
            raise ValueError(f"ShorterSideResize: max_size must be a positive int, got {max_size!r}")
        self.min_sizes = tuple(int(s) for s in sizes)
        self.max_size = int(max_size)
        self._resize = _AlbuPipeline(_resize_op())

    def get_size(self, h: int, w: int, rng: np.random.Generator | None = None) -> tuple[int, int]:
        """Output ``(new_h, new_w)``; draws the scale from ``rng`` when multi-scale."""
        if len(self.min_sizes) == 1:
            size = self.min_sizes[0]
        else:
            if rng is None:
                raise ValueError("ShorterSideResize: multi-scale resize needs an rng")
            size = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        return shorter_side_size(h, w, size, self.max_size)

    def __call__(
        self, image: np.ndarray, target: Target, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, Target]:
        h, w = image.shape[:2]
        nh, nw = self.get_size(h, w, rng)
        if (nh, nw) == (h, w):
            return image, target
        _set_resize(self._resize.ops[0], nh, nw)
        return self._resize(image, target)

    def __repr__(self) -> str:
        return f"ShorterSideResize(min_size={self.min_sizes}, max_size={self.max_size})"


class LargeScaleJitter:
    """Large-scale jitter (LSJ, Ghiasi et al. 2021) as in detectron2's new baselines.

    ``ResizeScale``: a scale ``s ~ U(scale)`` is drawn and the image is resized (aspect kept) to
    fit ``size * s`` square (``round(h * r), round(w * r)`` with ``r = s * size / max(h, w)``).
    ``FixedSizeCrop``: a random ``size x size`` window (smaller if the image is) is cropped, its
    offset uniform in the valid range and rounded. With ``pad=True`` the result is padded at the
    bottom/right to ``size x size`` (image with ``pad_value``, masks with 0, sem_seg with 255);
    by default it is not padded (detectron2's LSJ configs pad in the model).
    After the crop, boxes are recomputed from masks when masks are present, and instances
    narrower/lower than ``min_box_size`` are removed with their labels and masks.
    """

    def __init__(
        self,
        size: int = 1024,
        scale: tuple[float, float] = (0.1, 2.0),
        *,
        pad: bool = False,
        pad_value: int = 128,
        min_box_size: float = 1.0,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
            raise ValueError(f"LargeScaleJitter: size must be a positive int, got {size!r}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"LargeScaleJitter: scale must be (min, max) with 0 < min <= max, got {scale!r}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.pad = pad
        self.pad_value = pad_value
        self.min_box_size = min_box_size
        # The three op sequences an LSJ sample can need, each composed once.
        crop = A.Crop(x_min=0, y_min=0, x_max=1, y_max=1)
        self._pipelines = {
            (True, False): _AlbuPipeline(_resize_op()),
            (False, True): _AlbuPipeline(crop),
            (True, True): _AlbuPipeline(_resize_op(), A.Crop(x_min=0, y_min=0, x_max=1, y_max=1)),
        }

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[np.ndarray, Target]:
        h, w = image.shape[:2]
        s = rng.uniform(*self.scale)
        r = min(self.size * s / h, self.size * s / w)
        nh, nw = max(round(h * r), 1), max(round(w * r), 1)
        ch, cw = min(self.size, nh), min(self.size, nw)
        u = rng.uniform(0.0, 1.0, size=2)
        y0, x0 = round((nh - ch) * u[0]), round((nw - cw) * u[1])
        key = ((nh, nw) != (h, w), (ch, cw) != (nh, nw))
        if any(key):
            pipeline = self._pipelines[key]
            for op in pipeline.ops:
                if isinstance(op, A.Resize):
                    _set_resize(op, nh, nw)
                else:
                    op.x_min, op.y_min, op.x_max, op.y_max = x0, y0, x0 + cw, y0 + ch
            image, target = pipeline(image, target)
        if "masks" in target:
            target["boxes"] = boxes_from_masks(target["masks"])
        target, removed = _filter_small(target, self.min_box_size)
        if removed:
            logger.debug("LargeScaleJitter: removed %d instances smaller than %g px after the crop",
                         removed, self.min_box_size)
        if self.pad and (ch < self.size or cw < self.size):
            image, target = self._pad(image, target)
        return image, target

    def _pad(self, image: np.ndarray, target: Target) -> tuple[np.ndarray, Target]:
        h, w = image.shape[:2]
        out = np.full((self.size, self.size, 3), self.pad_value, dtype=np.uint8)
        out[:h, :w] = image
        target = dict(target)
        if "masks" in target:
            m = np.zeros((len(target["masks"]), self.size, self.size), dtype=np.uint8)
            m[:, :h, :w] = target["masks"]
            target["masks"] = m
        if "sem_seg" in target:
            sem = np.full((self.size, self.size), 255, dtype=np.asarray(target["sem_seg"]).dtype)
            sem[:h, :w] = target["sem_seg"]
            target["sem_seg"] = sem
        return out, target

    def __repr__(self) -> str:
        return f"LargeScaleJitter(size={self.size}, scale={self.scale}, pad={self.pad})"


class Photometric:
    """Colour jitter (``albumentations.ColorJitter``) on the image only; geometry is untouched."""

    def __init__(
        self,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.02,
        p: float = 0.8,
    ) -> None:
        self.compose = A.Compose(
            [A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=p)]
        )

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[np.ndarray, Target]:
        seed = int(rng.integers(2**31 - 1))
        if hasattr(self.compose, "set_random_seed"):  # albumentations >= 2
            self.compose.set_random_seed(seed)
            return self.compose(image=image)["image"], target
        py_state, np_state = random.getstate(), np.random.get_state()  # albumentations 1.x: globals
        try:
            random.seed(seed)
            np.random.seed(seed)
            return self.compose(image=image)["image"], target
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __repr__(self) -> str:
        return f"Photometric({self.compose.transforms[0]!r})"


class DetectionTransforms:
    """A sequence of detection transforms with its own seeded random generator.

    Args:
        steps: Callables ``(image, target, rng) -> (image, target)`` (the classes of this module).
        seed: Seed of the generator; ``None`` draws one from the OS.

    Call it as ``image, target = transforms(image, target)`` (numpy layouts in the module
    docstring). The input target is not modified.
    """

    def __init__(self, steps: Sequence[Any], *, seed: int | None = None) -> None:
        self.steps = list(steps)
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._pid = os.getpid()

    def set_seed(self, seed: int) -> None:
        """Restarts the random stream from ``seed`` (used per sample by the train loader)."""
        self._rng = np.random.default_rng(seed)
        self._pid = os.getpid()

    def __call__(self, image: np.ndarray, target: Target) -> tuple[np.ndarray, Target]:
        if self._pid != os.getpid():  # first call in a forked/spawned worker without set_seed
            self._rng = np.random.default_rng([self._seed or 0, torch.initial_seed() % (2**63)])
            self._pid = os.getpid()
        _check_sample(image, target)
        target = dict(target)
        h, w = image.shape[:2]
        boxes = np.asarray(target.get("boxes", np.zeros((0, 4))), dtype=np.float32).reshape(-1, 4).copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        target["boxes"] = boxes
        target["labels"] = np.asarray(target.get("labels", np.zeros(0)), dtype=np.int64)
        for step in self.steps:
            image, target = step(image, target, self._rng)
        return image, target

    def __repr__(self) -> str:
        return f"DetectionTransforms({self.steps!r})"


def build_transforms(
    *,
    training: bool,
    min_size: int | tuple[int, ...] | None = None,
    max_size: int = 1333,
    hflip_prob: float = 0.5,
    lsj: bool = False,
    lsj_size: int = 1024,
    lsj_scale: tuple[float, float] = (0.1, 2.0),
    photometric: bool = False,
    seed: int | None = None,
) -> DetectionTransforms:
    """Builds the data-loader transforms.

    Training: horizontal flip (``hflip_prob``), then either LSJ (``lsj=True``) or a shorter-side
    resize (``min_size``, a tuple = multi-scale), then optional colour jitter. Testing
    (``training=False``): only the deterministic resize (``min_size`` int; with ``lsj`` and no
    ``min_size``, shorter side ``lsj_size`` capped at ``lsj_size`` as in detectron2's LSJ test
    pipeline); ``hflip_prob`` and ``photometric`` are ignored.

    Args:
        training: Training or evaluation pipeline.
        min_size: Shorter side (int) or candidates (tuple, training only). ``None``: no resize in the
            loader (the model's preprocessor resizes).
        max_size: Cap on the longer side for the shorter-side resize.
        hflip_prob: Horizontal flip probability (training).
        lsj: Large-scale jitter instead of the shorter-side resize (training).
        lsj_size: LSJ output size (square).
        lsj_scale: LSJ scale range.
        photometric: Add colour jitter (training).
        seed: Seed of the transforms' generator (see the module docstring).

    Returns:
        A :class:`DetectionTransforms` (numpy in, numpy out).

    Raises:
        ValueError: Inconsistent or invalid arguments.
    """
    if lsj and min_size is not None and training:
        raise ValueError("build_transforms: lsj=True replaces the shorter-side resize; pass min_size=None")
    steps: list[Any] = []
    if training:
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"build_transforms: hflip_prob must be in [0, 1], got {hflip_prob!r}")
        if hflip_prob > 0:
            steps.append(RandomHorizontalFlip(hflip_prob))
        if lsj:
            steps.append(LargeScaleJitter(lsj_size, lsj_scale))
        elif min_size is not None:
            steps.append(ShorterSideResize(min_size, max_size))
        if photometric:
            steps.append(Photometric())
    else:
        if min_size is not None:
            if not isinstance(min_size, (int, np.integer)):
                raise ValueError(
                    f"build_transforms: at test time min_size must be a single int, got {min_size!r}"
                )
            steps.append(ShorterSideResize(int(min_size), max_size))
        elif lsj:
            steps.append(ShorterSideResize(lsj_size, lsj_size))
    return DetectionTransforms(steps, seed=seed)

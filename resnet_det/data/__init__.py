"""Data pipeline: COCO-format datasets, augmentation, samplers, loaders and the synthetic shapes set.

Conventions (torchvision's detector I/O): an image is a ``float32 [3, H, W]`` RGB tensor in
``[0, 1]``; a target holds ``boxes`` (``float32 [K, 4]``, xyxy, absolute pixels), ``labels``
(``int64 [K]``, 1..num_classes, 0 = background), ``image_id`` (int), ``orig_size`` ((H, W) on disk),
optional ``masks`` (``uint8 [K, H, W]``) and ``sem_seg`` (``int64 [H, W]``, 255 = ignore).

COCO files are validated into a columnar index (:mod:`.coco_index`), cached per annotation file
(:mod:`.index_cache`: one process per machine builds it, the other ranks and later runs load it).
"""

from .build import TrainLoader, build_test_loader, build_train_loader, collate, sample_seed
from .coco import BOX_CLIP_TOLERANCE, CocoDetection, DatasetError, DatasetReport
from .coco_index import CocoIndex, build_index
from .images import ImageLoadError, load_image
from .index_cache import index_cache_dir
from .samplers import GroupedBatchSampler, InferenceSampler, default_rank_world_size
from .shapes import (
    DEFAULT_CLASSES,
    SHAPE_CLASSES,
    OutputExistsError,
    default_cache_root,
    ensure_shapes,
    make_shapes,
    shapes_paths,
)
from .transforms import (
    DetectionTransforms,
    LargeScaleJitter,
    Photometric,
    RandomHorizontalFlip,
    ShorterSideResize,
    boxes_from_masks,
    build_transforms,
    shorter_side_size,
)

__all__ = [
    "BOX_CLIP_TOLERANCE",
    "DEFAULT_CLASSES",
    "SHAPE_CLASSES",
    "CocoDetection",
    "CocoIndex",
    "DatasetError",
    "DatasetReport",
    "DetectionTransforms",
    "GroupedBatchSampler",
    "ImageLoadError",
    "InferenceSampler",
    "LargeScaleJitter",
    "OutputExistsError",
    "Photometric",
    "RandomHorizontalFlip",
    "ShorterSideResize",
    "TrainLoader",
    "boxes_from_masks",
    "build_index",
    "build_test_loader",
    "build_train_loader",
    "build_transforms",
    "collate",
    "default_cache_root",
    "default_rank_world_size",
    "ensure_shapes",
    "index_cache_dir",
    "load_image",
    "make_shapes",
    "sample_seed",
    "shapes_paths",
    "shorter_side_size",
]

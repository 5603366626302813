"""From a config to a trained and evaluated model: what `tools/train.py` and `tools/eval.py` run.

Tasks are registered here (`register_task`): `detection` by this package, the mask and semantic
tasks by `segmentation` when it is imported, so the dependency arrows stay one-way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet_det.common import (
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    resolve_device,
    seed_everything,
)

from ..build import build_detector
from ..config import Config, ModelConfig
from ..convert import load_detector_weights
from .trainer import build_trainer

log = logging.getLogger(__name__)


@dataclass
class Task:
    """What a `model.task` needs: a model builder, the targets its dataset must carry, its metrics.

    Attributes:
        name: the `model.task` value.
        build_model: `(model_cfg, num_foreground_classes) -> nn.Module` in torchvision's convention.
        with_masks / with_semantic: the dataset must provide instance masks / a semantic map.
        iou_types: COCO evaluation types ("bbox", "segm"); empty for none.
        semantic: evaluate mean IoU of an `outputs[i]["sem_seg"]` prediction.
    """

    name: str
    build_model: Callable[[ModelConfig, int], nn.Module]
    with_masks: bool = False
    with_semantic: bool = False
    iou_types: tuple[str, ...] = ("bbox",)
    semantic: bool = False


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> None:
    """Add a task; a duplicate name raises `KeyError`."""
    if task.name in TASKS:
        raise KeyError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task


register_task(Task("detection", build_detector))


def get_task(name: str) -> Task:
    if name not in TASKS:
        hint = " (import segmentation to register the mask and semantic tasks)" if "detection" in TASKS else ""
        raise ValueError(f"model.task={name!r} is not available; registered: {sorted(TASKS)}{hint}")
    return TASKS[name]


# -------------------------------------------------------------------------------------------- data
def dataset_paths(cfg: Config, split: str) -> dict[str, Path | None]:
    """Images folder, annotation file and (optional) semantic folder of a split."""
    data = cfg.data
    if data.root is None:
        from ..data.shapes import ensure_shapes, shapes_paths

        root = ensure_shapes(num_train=data.shapes_num_train, num_val=data.shapes_num_val,
                             image_size=data.shapes_image_size, seed=data.shapes_seed)
        p = shapes_paths(root, split)
        return {"image_root": p["image_root"], "ann_file": p["ann_file"], "semantic_root": p["semantic_root"]}
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={data.root!r} is not a folder; point it at a COCO folder with "
                                f"{data.train_images}/, {data.val_images}/ and annotations/ (or leave it null for the "
                                "built-in synthetic shapes)")
    images = root / (data.train_images if split == "train" else data.val_images)
    ann = root / (data.train_annotations if split == "train" else data.val_annotations)
    for p in (images, ann):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist (data.root={data.root!r}); expected the COCO layout "
                                    f"{data.train_images}/, {data.val_images}/, {data.train_annotations}")
    return {"image_root": images, "ann_file": ann, "semantic_root": None}


def build_dataset(cfg: Config, task: Task, split: str) -> Any:
    """The COCO-format dataset of a split, with the targets the task needs and the augmentations."""
    from ..data import CocoDetection
    from ..data.transforms import build_transforms

    training = split == "train"
    paths = dataset_paths(cfg, split)
    transforms = build_transforms(training=True, hflip_prob=cfg.data.hflip_prob, lsj=cfg.data.lsj,
                                  photometric=cfg.data.photometric, seed=cfg.train.seed) if training else None
    return CocoDetection(paths["image_root"], paths["ann_file"], training=training,
                         keep_empty=cfg.data.keep_empty_train if training else True, with_masks=task.with_masks,
                         with_semantic=task.with_semantic,
                         semantic_root=paths["semantic_root"] if task.with_semantic else None, transforms=transforms)


# -------------------------------------------------------------------------------------------- model
def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The task's model, with `model.weights` loaded when given (ours or a torchvision checkpoint)."""
    task = get_task(cfg.model.task)
    model = task.build_model(cfg.model, num_classes)
    if cfg.model.weights:
        load_detector_weights(model, cfg.model.weights)
    return model


# --------------------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, dataset: Any, task: Task, *, device: torch.device, amp: str = "off",
             output_dir: str | Path | None = None, batch_size: int = 4, num_workers: int = 2,
             progress: bool = True) -> dict[str, Any]:
    """Run `model` over `dataset` (sharded over processes) and compute the task's metrics.

    The task's evaluators (COCO for `task.iou_types`, mean IoU for `task.semantic`) run as one
    `DatasetEvaluators` fed by `inference_on_dataset`. Every process must call this (the evaluators
    gather across processes); the main process gets the metrics, the others `{}`.
    """
    from ..data.build import build_test_loader
    from ..evaluation import COCOEvaluator, DatasetEvaluator, DatasetEvaluators, SemSegEvaluator, inference_on_dataset

    evaluators: list[DatasetEvaluator] = []
    if task.iou_types:
        evaluators.append(COCOEvaluator(dataset.ann_file, iou_types=task.iou_types,
                                        label_to_cat_id=dataset.label_to_cat_id, output_dir=output_dir,
                                        class_names=dataset.class_names))
    if task.semantic:
        evaluators.append(SemSegEvaluator(len(dataset.class_names), class_names=dataset.class_names,
                                          output_dir=output_dir))
    loader = build_test_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    return inference_on_dataset(model, loader, DatasetEvaluators(evaluators), device=device, amp=amp,
                                progress=progress)


# ------------------------------------------------------------------------------------------- train
def train(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate as `cfg` says. Works with one process and under `torchrun`."""
    rank, world, _ = init_distributed(cfg.train.device)
    try:
        seed_everything(cfg.train.seed, rank)
        task = get_task(cfg.model.task)
        train_set = build_dataset(cfg, task, "train")
        val_set = build_dataset(cfg, task, "val")
        num_classes = cfg.model.num_classes or train_set.num_classes
        model = build_model(cfg, num_classes)
        if cfg.train.compile:
            # The backbone (+FPN) has no data-dependent control flow and compiles whole; the heads,
            # with their data-dependent NMS, run eagerly.
            model.backbone = torch.compile(model.backbone)
        from ..data.build import build_train_loader

        loader = build_train_loader(train_set, images_per_batch=cfg.solver.ims_per_batch,
                                    num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                                    aspect_grouping=cfg.data.aspect_grouping)
        device = resolve_device(cfg.train.device)
        out = Path(cfg.train.output_dir)

        def eval_fn(m: nn.Module, iteration: int) -> dict[str, Any]:
            return evaluate(m, val_set, task, device=device, amp=cfg.train.amp, output_dir=out / "eval",
                            num_workers=min(2, cfg.data.num_workers), progress=progress)

        if is_main_process():
            log.info("task %s, %d classes, %d train / %d val images, %d process(es), device %s", task.name,
                     num_classes, len(train_set), len(val_set), world, device)
        trainer = build_trainer(cfg, model, loader, eval_fn=eval_fn, progress=progress)
        start = time.time()
        result = trainer.train(resume=resume)
        result["train_minutes"] = (time.time() - start) / 60
        if is_main_process():
            summary = {"iteration": result.get("iteration"), "stopped_early": result.get("stopped_early"),
                       "train_minutes": result["train_minutes"], "eval": result.get("eval"),
                       "world_size": get_world_size(), "rank": get_rank()}
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        loader.close()
        return result
    finally:
        cleanup()


def evaluate_checkpoint(cfg: Config, checkpoint: str, *, progress: bool = True) -> dict[str, Any]:
    """Build the config's model, load `checkpoint` (ours or torchvision's), evaluate on the val split."""
    init_distributed(cfg.train.device)
    try:
        task = get_task(cfg.model.task)
        val_set = build_dataset(cfg, task, "val")
        num_classes = cfg.model.num_classes or val_set.num_classes
        model = get_task(cfg.model.task).build_model(cfg.model, num_classes)
        load_detector_weights(model, checkpoint)
        device = resolve_device(cfg.train.device)
        model.to(device)
        return evaluate(model, val_set, task, device=device, amp=cfg.train.amp,
                        output_dir=Path(cfg.train.output_dir) / "eval", num_workers=cfg.data.num_workers,
                        progress=progress)
    finally:
        cleanup()

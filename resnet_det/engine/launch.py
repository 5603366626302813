"""From a config and a task to a trained and evaluated model: what ``resnet-det train`` / ``eval`` run.

The caller (the command line, a test) chooses the :class:`~resnet_det.engine.task.Task` (``resnet_det.tasks.detection``,
``resnet_det.tasks.segmentation``) and passes it in: the engine never looks tasks up by name, so it does not
depend on any task package.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detection.convert import load_detector_weights
from resnet_det_common import (
    atomic_write,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    logging_scope,
    resolve_device,
    seed_everything,
    writing,
)
from resnet_det_common.dist import ProcessGroupError, is_process_group_failure

from ..config import Config, dump_config
from .task import Task
from .trainer import build_trainer, check_global_batch

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- data
def dataset_paths(cfg: Config, split: str) -> dict[str, Path | None]:
    """Images folder, annotation file (COCO) and (optional) semantic folder of a split.

    ``data.root`` null: the built-in synthetic shapes. Otherwise ``data.format``'s layout
    (:mod:`resnet_det.data.formats`), converted to a COCO file first where the layout is not COCO.
    """
    data = cfg.data
    if data.root is None:
        if data.format != "coco":
            raise ValueError(f"data.format={data.format!r} needs data.root, the dataset folder (e.g. one written by "
                             f"`resnet-det make-shapes --format {data.format} DIR`); data.root null means the built-in "
                             "synthetic shapes, which are COCO: drop data.format or set data.format=coco")
        from ..data.shapes import ensure_shapes, shapes_paths

        root = ensure_shapes(num_train=data.shapes_num_train, num_val=data.shapes_num_val,
                             image_size=data.shapes_image_size, seed=data.shapes_seed)
        p = shapes_paths(root, split)
        return {"image_root": p["image_root"], "ann_file": p["ann_file"], "semantic_root": p["semantic_root"]}
    from ..data.formats import get_format

    root = Path(data.root).expanduser()
    fmt = get_format(data.format)
    if not root.exists():
        raise FileNotFoundError(f"data.root={data.root!r} does not exist; point it at a dataset in {fmt.layout} "
                                "(or leave it null for the built-in synthetic shapes)")
    files = fmt.resolve(data, split)
    return {"image_root": files.image_root, "ann_file": files.ann_file, "semantic_root": files.semantic_root}


def build_dataset(cfg: Config, task: Task, split: str) -> Any:
    """The COCO-format dataset of a split, with the targets the task needs and the augmentations.

    Every process of a run calls this together: for a large annotation file (COCO's), the first process of
    each machine builds the validated index and caches it (``$RESNET_DET_CACHE/coco_index``, see
    :mod:`resnet_det.data.index_cache`) while the others wait and then load it.
    """
    from ..data import CocoDetection
    from ..data.index_cache import index_cache_dir
    from ..data.transforms import build_transforms

    training = split == "train"
    paths = dataset_paths(cfg, split)
    transforms = build_transforms(training=True, hflip_prob=cfg.data.hflip_prob, lsj=cfg.data.lsj,
                                  photometric=cfg.data.photometric, seed=cfg.train.seed) if training else None
    ann_file = paths["ann_file"]
    return CocoDetection(paths["image_root"], ann_file, training=training,
                         keep_empty=cfg.data.keep_empty_train if training else True, with_masks=task.with_masks,
                         with_semantic=task.with_semantic,
                         semantic_root=paths["semantic_root"] if task.with_semantic else None, transforms=transforms,
                         cache_dir=index_cache_dir(ann_file) if ann_file is not None else None)


# -------------------------------------------------------------------------------------------- model
def build_model(cfg: Config, task: Task, num_classes: int | None = None) -> nn.Module:
    """The task's model for ``cfg.model``; ``model.num_classes`` (foreground) if set, else ``num_classes``
    (the dataset's). The builder loads ``model.weights`` / ``model.backbone.weights`` when given."""
    spec = cfg.model
    if spec.num_classes is None:
        if num_classes is None:
            raise ValueError("model.num_classes is null and no dataset gives it: set model.num_classes "
                             "(foreground classes, e.g. model.num_classes=80)")
        spec = spec.replace(num_classes=num_classes)
    return task.build_model(spec)


# --------------------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, dataset: Any, task: Task, *, device: torch.device, amp: str = "off",
             output_dir: str | Path | None = None, batch_size: int = 4, num_workers: int = 2,
             progress: bool = True, metrics: Sequence[str] = ()) -> dict[str, Any]:
    """Run `model` over `dataset` (sharded over processes) and compute the task's metrics.

    The task's evaluators, and those of the named `metrics` (`test.metrics`, see
    `resnet_det.evaluation.registry`), run as one `DatasetEvaluators` fed by `inference_on_dataset`. Every
    process must call this (the evaluators gather across processes); the main process gets the metrics, the
    others `{}`.
    """
    from ..data.build import build_test_loader
    from ..evaluation import DatasetEvaluators, inference_on_dataset
    from ..evaluation.registry import build_metric

    folder = Path(output_dir) if output_dir is not None else None
    evaluators = task.build_evaluators(dataset, folder)
    evaluators += [build_metric(name, dataset, folder) for name in metrics]
    loader = build_test_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    results = inference_on_dataset(model, loader, DatasetEvaluators(evaluators), device=device, amp=amp,
                                   progress=progress)
    _log_unreadable(dataset, "left out of the evaluation")
    return results


def _log_unreadable(dataset: Any, what: str) -> None:
    """One warning line with the images of ``dataset`` that could not be read (its report counts them)."""
    report = getattr(dataset, "report", None)
    count = report.skipped.get("image_unreadable", 0) if report is not None else 0
    if count:
        examples = "; ".join(report.examples.get("image_unreadable", []))
        log.warning("%d of the %d images of %s could not be read and were %s (this process; e.g. %s)", count,
                    len(dataset), report.ann_file, what, examples)


# ------------------------------------------------------------------------------------------- train
def _check_task(cfg: Config, task: Task) -> None:
    if not isinstance(task, Task):
        raise TypeError(f"task must be a resnet_det.engine.task.Task, got {type(task).__name__}")
    if task.name != cfg.model.task:
        raise ValueError(f"the config asks for model.task={cfg.model.task!r} but the {task.name!r} task was given")


def train(cfg: Config, task: Task, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate as `cfg` says. Works with one process and under `torchrun`.

    Everything logged from here (the dataset reports included) reaches the console and, on rank 0,
    ``<train.output_dir>/log.txt``.
    """
    _check_task(cfg, task)
    rank, world, _ = init_distributed(cfg.train.device, timeout_minutes=cfg.train.dist_timeout_minutes)
    try:
        with logging_scope(cfg.train.output_dir, rank=rank):
            try:
                return _train(cfg, task, rank=rank, world=world, resume=resume, progress=progress)
            except Exception as err:
                if world > 1 and is_process_group_failure(err):
                    raise _lost_peer(cfg, rank, world, err) from err
                raise
    finally:
        cleanup()


def _lost_peer(cfg: Config, rank: int, world: int, err: BaseException) -> ProcessGroupError:
    """The one-line error of a process whose peers died or went silent, with what is safe on disk."""
    from .checkpoint import last_checkpoint_name

    out = Path(cfg.train.output_dir)
    name = last_checkpoint_name(out)
    kept = f"the last complete checkpoint is '{name}' in {out}" if name else f"no checkpoint was completed in {out}"
    cause = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:200]
    return ProcessGroupError(
        f"process {rank} of {world} stopped: the process group failed ({type(err).__name__}: {cause}); another "
        f"process died (killed, out of memory, a crash: see its log) or did not answer within "
        f"train.dist_timeout_minutes={cfg.train.dist_timeout_minutes:g}. {kept[0].upper()}{kept[1:]}; restart every "
        "process with --resume"
    )


def write_run_config(cfg: Config) -> Path | None:
    """Writes the resolved config to ``<train.output_dir>/config.yaml`` on the main process (the run's folder is
    the launch's: ``resnet-det eval`` / ``infer`` read the run back from it); returns the path, None elsewhere.

    Raises:
        OutputWriteError: The file cannot be written (a full disk), with one line naming it.
    """
    if not is_main_process():
        return None
    path = Path(cfg.train.output_dir) / "config.yaml"
    with writing(path, "config file"):
        dump_config(cfg, path)
    return path


def _train(cfg: Config, task: Task, *, rank: int, world: int, resume: bool, progress: bool) -> dict[str, Any]:
    seed_everything(cfg.train.seed, rank)
    train_set = build_dataset(cfg, task, "train")
    val_set = build_dataset(cfg, task, "val")
    num_classes = cfg.model.num_classes or train_set.num_classes
    from detection.models import frozen_bn_without_weights

    untrained_norm = frozen_bn_without_weights(cfg.model)
    if untrained_norm and is_main_process():
        log.warning("%s", untrained_norm)
    model = build_model(cfg, task, num_classes)
    if cfg.train.compile:
        # The backbone (+FPN) has no data-dependent control flow and compiles whole; the heads,
        # with their data-dependent NMS, run eagerly.
        model.backbone = torch.compile(model.backbone)
    from ..data.build import build_train_loader

    check_global_batch(cfg, world)
    # ims_per_batch is the images per optimizer step; with accumulation each pass loads 1/k of them.
    loader = build_train_loader(train_set, images_per_batch=cfg.solver.ims_per_batch // cfg.solver.accumulate,
                                num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                                aspect_grouping=cfg.data.aspect_grouping)
    device = resolve_device(cfg.train.device)
    out = Path(cfg.train.output_dir)

    def eval_fn(m: nn.Module, iteration: int) -> dict[str, Any]:
        return evaluate(m, val_set, task, device=device, amp=cfg.train.amp, output_dir=out / "eval",
                        num_workers=min(2, cfg.data.num_workers), progress=progress, metrics=cfg.test.metrics)

    if is_main_process():
        log.info("task %s, %d classes, %d train / %d val images, %d process(es), device %s", task.name,
                 num_classes, len(train_set), len(val_set), world, device)
    write_run_config(cfg)
    trainer = build_trainer(cfg, model, loader, eval_fn=eval_fn, progress=progress)
    start = time.time()
    result = trainer.train(resume=resume)
    result["train_minutes"] = (time.time() - start) / 60
    _log_unreadable(train_set, "skipped in training")
    if is_main_process():
        summary = {"iteration": result.get("iteration"), "stopped_early": result.get("stopped_early"),
                   "train_minutes": result["train_minutes"], "eval": result.get("eval"),
                   "world_size": get_world_size(), "rank": get_rank(),
                   "unreadable_images": {"train": train_set.report.skipped.get("image_unreadable", 0),
                                         "val": val_set.report.skipped.get("image_unreadable", 0)}}
        with writing(out / "summary.json", "summary file"):
            atomic_write(out / "summary.json", json.dumps(summary, indent=2, default=float))
    loader.close()
    return result


def ema_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a checkpoint of ours (``test.use_ema``): from its trainer state's ``ema`` entry, or
    the file itself when it is an EMA export (``model_final_ema.safetensors``).

    Raises:
        WeightsError: (a ``ValueError``) The checkpoint has no EMA (trained without ``train.ema``), or no readable
            trainer state beside it.
    """
    from backbone.weights import WeightsError

    from .checkpoint import STATE_SUFFIX, WEIGHTS_SUFFIX, CheckpointError, _load_trainer_state, load_model_weights

    path = Path(checkpoint)
    stem = path.name.removesuffix(WEIGHTS_SUFFIX).removesuffix(STATE_SUFFIX)
    if stem.endswith("_ema") and path.with_name(stem + WEIGHTS_SUFFIX).is_file():
        return load_model_weights(path.with_name(stem + WEIGHTS_SUFFIX))
    state_path = path.with_name(stem + STATE_SUFFIX)
    if not state_path.is_file():
        raise WeightsError(f"test.use_ema=true: {checkpoint} has no trainer state {state_path.name} beside it to read "
                           "the EMA from; give one of our checkpoints (model_final) or its model_final_ema.safetensors")
    try:
        ema = _load_trainer_state(state_path).get("ema")
    except CheckpointError as err:  # a damaged or foreign state file: the checkpoint's problem, said in one line
        raise WeightsError(f"test.use_ema=true: {err}") from None
    if not ema:
        raise WeightsError(f"test.use_ema=true: checkpoint {stem} holds no EMA (it was trained without train.ema); "
                           "drop test.use_ema to evaluate its weights")
    return dict(ema["weights"])


def check_test_aug(cfg: Config, task: Task) -> None:
    """Raises ``ValueError`` when ``test.aug`` asks for an augmentation that ``task`` does not have."""
    if cfg.test.aug.enabled and task.tta is None:
        raise ValueError(f"test.aug: the {task.name!r} task has no test-time augmentation (the detection and "
                         "instance tasks have); drop the test.aug settings")


def with_test_aug(model: nn.Module, cfg: Config, task: Task) -> nn.Module:
    """``model`` under ``test.aug``'s test-time augmentation, or ``model`` itself when none is asked for."""
    aug = cfg.test.aug
    if not aug.enabled:
        return model
    check_test_aug(cfg, task)
    assert task.tta is not None
    wrapped = task.tta(model, min_sizes=tuple(aug.min_sizes), max_size=aug.max_size, flip=aug.flip)
    log.info("test-time augmentation: %d runs per image (test.aug.min_sizes=%s, max_size=%s, flip=%s; [] and null "
             "are the model's test size)", len(getattr(wrapped, "augmentations", ())), list(aug.min_sizes),
             aug.max_size, aug.flip)
    return wrapped


def evaluate_checkpoint(cfg: Config, task: Task, checkpoint: str, *, progress: bool = True) -> dict[str, Any]:
    """Build the config's model, load `checkpoint` (ours or torchvision's), evaluate on the val split (under
    ``test.aug``'s test-time augmentation when the config asks for one)."""
    _check_task(cfg, task)
    check_test_aug(cfg, task)
    init_distributed(cfg.train.device)
    try:
        val_set = build_dataset(cfg, task, "val")
        # The checkpoint replaces every weight: don't read model.weights / model.backbone.weights first.
        spec = cfg.model.replace(weights=None, backbone_weights=None)
        model = build_model(dataclasses.replace(cfg, model=spec), task, val_set.num_classes)
        load_detector_weights(model, ema_weights(checkpoint) if cfg.test.use_ema else checkpoint)
        device = resolve_device(cfg.train.device)
        model = with_test_aug(model.to(device), cfg, task)
        return evaluate(model, val_set, task, device=device, amp=cfg.train.amp,
                        output_dir=Path(cfg.train.output_dir) / "eval", num_workers=cfg.data.num_workers,
                        progress=progress, metrics=cfg.test.metrics)
    finally:
        cleanup()

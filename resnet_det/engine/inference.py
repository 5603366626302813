"""Run a trained model on image files (COCO results JSON + drawings) or on a dataset beside its ground truth.

- :func:`run_inference`: ``resnet-det infer --input ...``: every detection to ``results.json`` (through
  the project's one COCO converter, :func:`resnet_det.evaluation.instances_to_coco_json`) and each image
  drawn to ``vis/``.
- :func:`visualize_dataset`: ``resnet-det infer --show-gt N``: N images of the config's val split,
  ground truth on the left and predictions on the right (like detectron2's ``visualize_json_results``),
  to ``vis_gt/``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from detection.visualize import draw_instances, side_by_side, to_pil
from resnet_det_common import atomic_write, autocast, progress_bar, writing

from ..data.images import load_image
from ..evaluation import instances_to_coco_json
from ..evaluation.evaluator import nonfinite_check, warn_nonfinite

_log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from a mix of files and folders (folders: their images, sorted, not recursive)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"input {str(p)!r} is neither an image file nor a folder")
    return out


def image_id_of(path: Path, index: int) -> int:
    """COCO file names are the image id (`000000391895.jpg`); other names get their index."""
    m = re.fullmatch(r"0*(\d+)", path.stem)
    return int(m.group(1)) if m else index


@torch.no_grad()
def predict(model: nn.Module, paths: Sequence[Path], *, device: torch.device, batch_size: int = 2,
            amp: str = "off") -> Iterator[tuple[Path, np.ndarray, dict[str, torch.Tensor]]]:
    """Yield `(path, image HxWx3 uint8, output)` per image; unreadable files raise with their name."""
    model.eval()
    check_nonfinite = nonfinite_check(model)
    n_nonfinite = 0
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        arrays = [load_image(p) for p in chunk]
        images = [torch.from_numpy(a).permute(2, 0, 1).float().div(255).to(device) for a in arrays]
        with autocast(device, amp):
            outputs = model(images)
        for i in check_nonfinite() if check_nonfinite is not None else ():
            n_nonfinite += 1
            warn_nonfinite(str(chunk[i]), n_nonfinite)
        for p, a, o in zip(chunk, arrays, outputs):
            yield p, a, {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()}
    if n_nonfinite:
        _log.warning("%d of %d images got no detections: the model produced non-finite values (NaN/inf) for them",
                     n_nonfinite, len(paths))


def render(image: np.ndarray, output: Mapping[str, torch.Tensor], *, class_names: Sequence[str] | None = None,
           score_thresh: float = 0.5) -> Image.Image:
    """Draw detections (score >= score_thresh) on an HxWx3 uint8 image: masks blended, boxes, labels
    (through :func:`detection.visualize.draw_instances`, i.e. torchvision's drawing utilities)."""
    return to_pil(draw_instances(image, output, class_names=class_names, score_thresh=score_thresh))


def run_inference(model: nn.Module, inputs: Sequence[str | Path], output_dir: str | Path, *,
                  device: torch.device, class_names: Sequence[str] | None = None,
                  label_to_cat_id: Mapping[int, int] | None = None, score_thresh: float = 0.5,
                  batch_size: int = 2, amp: str = "off", progress: bool = True) -> Path:
    """Predict every image; write `<output_dir>/results.json` (COCO) and `<output_dir>/vis/<name>.jpg`."""
    paths = list_images(inputs)
    out = Path(output_dir)
    (out / "vis").mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with progress_bar(total=len(paths), desc="infer", unit="img", enabled=progress) as bar:
        for i, (path, array, output) in enumerate(predict(model, paths, device=device, batch_size=batch_size,
                                                          amp=amp)):
            if "boxes" in output:
                results.extend(instances_to_coco_json(image_id_of(path, i), output, label_to_cat_id,
                                                      iou_types=("bbox", "segm") if "masks" in output else ("bbox",)))
            drawn = out / "vis" / f"{path.stem}.jpg"
            with writing(drawn, "drawing"):
                render(array, output, class_names=class_names, score_thresh=score_thresh).save(drawn, quality=92)
            if bar is not None:
                bar.update(1)
    with writing(out / "results.json", "results file"):
        return atomic_write(out / "results.json", json.dumps(results))


@torch.no_grad()
def visualize_dataset(model: nn.Module, dataset: Any, output_dir: str | Path, *, num_images: int,
                      device: torch.device, score_thresh: float = 0.5, amp: str = "off",
                      progress: bool = True) -> list[Path]:
    """Draws the ground truth (left) beside the model's predictions (right) for the first images of a dataset.

    Args:
        model: A model in torchvision's convention (eval outputs at each image's size).
        dataset: A dataset of ``(image float [3, H, W] in [0, 1], target)`` in image coordinates, e.g. the
            config's val split (``class_names`` name the labels).
        output_dir: ``<output_dir>/vis_gt/<image id>.jpg`` are written.
        num_images: How many images (the first ones; at most the dataset's size).
        device: Where the model runs.
        score_thresh: Predictions with a lower score are not drawn (the ground truth is always drawn).
        amp: ``"bf16"``, ``"fp16"`` or ``"off"``.
        progress: Show a progress bar (on a terminal).

    Returns:
        The files written.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    out = Path(output_dir) / "vis_gt"
    out.mkdir(parents=True, exist_ok=True)
    names = getattr(dataset, "class_names", None)
    model.eval()
    written: list[Path] = []
    count = min(num_images, len(dataset))
    check_nonfinite, n_nonfinite = nonfinite_check(model), 0
    with progress_bar(total=count, desc="visualize", unit="img", enabled=progress) as bar:
        for index in range(count):
            image, target = dataset[index]
            with autocast(device, amp):
                (output,) = model([image.to(device)])
            if check_nonfinite is not None and check_nonfinite():
                n_nonfinite += 1
                warn_nonfinite(f"image {target.get('image_id', index)}", n_nonfinite)
            output = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in output.items()}
            gt = draw_instances(image, target, class_names=names)
            pred = draw_instances(image, output, class_names=names, score_thresh=score_thresh)
            path = out / f"{int(target.get('image_id', index))}.jpg"
            with writing(path, "drawing"):
                to_pil(side_by_side(gt, pred)).save(path, quality=92)
            written.append(path)
            if bar is not None:
                bar.update(1)
    return written

"""Run a trained model on image files: COCO results JSON and rendered images (boxes, labels, masks)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from resnet_det.common import autocast

from .visualize import draw_instances, to_pil

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
    from .data.images import load_image

    model.eval()
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        arrays = [load_image(p) for p in chunk]
        images = [torch.from_numpy(a).permute(2, 0, 1).float().div(255).to(device) for a in arrays]
        with autocast(device, amp):
            outputs = model(images)
        for p, a, o in zip(chunk, arrays, outputs):
            yield p, a, {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()}


def to_coco_results(image_id: int, output: Mapping[str, torch.Tensor],
                    label_to_cat_id: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """One COCO result dict per detection (bbox as xywh; RLE `segmentation` when masks exist)."""
    boxes = output["boxes"].tolist()
    scores = output["scores"].tolist()
    labels = output["labels"].tolist()
    rles = None
    if "masks" in output and len(boxes):
        from .evaluation import encode_masks

        rles = encode_masks(output["masks"][:, 0] > 0.5 if output["masks"].dim() == 4 else output["masks"])
    results = []
    for i, ((x1, y1, x2, y2), s, lab) in enumerate(zip(boxes, scores, labels)):
        r = {"image_id": image_id, "category_id": int(label_to_cat_id.get(lab, lab) if label_to_cat_id else lab),
             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
        if rles is not None:
            r["segmentation"] = rles[i]
        results.append(r)
    return results


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
    from tqdm import tqdm

    paths = list_images(inputs)
    out = Path(output_dir)
    (out / "vis").mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for i, (path, array, output) in enumerate(tqdm(predict(model, paths, device=device, batch_size=batch_size,
                                                           amp=amp), total=len(paths), disable=not progress,
                                                   desc="infer")):
        if "boxes" in output:
            results.extend(to_coco_results(image_id_of(path, i), output, label_to_cat_id))
        render(array, output, class_names=class_names, score_thresh=score_thresh).save(
            out / "vis" / f"{path.stem}.jpg", quality=92)
    path = out / "results.json"
    path.write_text(json.dumps(results))
    return path

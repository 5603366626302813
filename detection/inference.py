"""Run a trained model on image files: COCO results JSON and rendered images (boxes, labels, masks)."""

from __future__ import annotations

import colorsys
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from resnet_det.common import autocast

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


def _colour(label: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.75, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def render(image: np.ndarray, output: Mapping[str, torch.Tensor], *, class_names: Sequence[str] | None = None,
           score_thresh: float = 0.5) -> Image.Image:
    """Draw detections (score >= score_thresh) on an HxWx3 uint8 image: masks blended, boxes, labels."""
    canvas = image.astype(np.float32).copy()
    keep = output["scores"] >= score_thresh
    labels = output["labels"][keep].tolist()
    if "masks" in output and keep.any():
        masks = output["masks"][keep]
        masks = (masks[:, 0] if masks.dim() == 4 else masks) > 0.5
        for m, lab in zip(masks.numpy(), labels):
            canvas[m] = 0.5 * canvas[m] + 0.5 * np.array(_colour(lab), dtype=np.float32)
    if "sem_seg" in output:
        seg = output["sem_seg"].numpy()
        for lab in np.unique(seg):
            if lab in (0, 255):
                continue
            canvas[seg == lab] = 0.6 * canvas[seg == lab] + 0.4 * np.array(_colour(int(lab)), dtype=np.float32)
    img = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for box, score, lab in zip(output["boxes"][keep].tolist() if "boxes" in output else [],
                               output["scores"][keep].tolist() if "scores" in output else [], labels):
        colour = _colour(lab)
        draw.rectangle(box, outline=colour, width=2)
        name = class_names[lab] if class_names and 0 <= lab < len(class_names) else str(lab)
        text = f"{name} {score:.2f}"
        x, y = box[0], max(0, box[1] - 11)
        draw.rectangle([x, y, x + 6 * len(text) + 2, y + 11], fill=colour)
        draw.text((x + 1, y), text, fill=(0, 0, 0))
    return img


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

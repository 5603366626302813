"""``resnet-det infer --onnx model.onnx``: run an exported detector with ONNX Runtime, numpy and Pillow only.

This module imports neither torch nor the model code (``backbone``, ``detection``, ``segmentation``), so a
deployment image needs only ``pip install onnxruntime numpy pillow`` (tested: ``sys.modules`` after a run).
It writes the COCO results JSON (``bbox``, and ``segmentation`` as compressed RLE for Mask R-CNN) and the
images with the detections drawn, like ``resnet-det infer CONFIG --checkpoint W``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Distinct colours for the classes (RGB), cycled.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from a mix of files and folders (a folder: its images, sorted, not recursive)."""
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


def load_image(path: Path) -> np.ndarray:
    """uint8 `(H, W, 3)` RGB, the exported graph's input."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    except OSError as e:
        raise ValueError(f"could not read image {str(path)!r}: {e}") from None


class OnnxDetector:
    """An exported detector in one ONNX Runtime session: `detector(image uint8 (H, W, 3))` -> dict of numpy
    arrays `boxes (D, 4)` xyxy pixels, `scores (D,)`, `labels (D,)` (+ `masks (D, 1, H, W)`)."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise FileNotFoundError(f"--onnx {str(path)!r} does not exist (write one with resnet-det export)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for unreadable or invalid files
            raise ValueError(f"--onnx {str(path)!r} is not a model ONNX Runtime can load: {e}") from None
        inputs = self.session.get_inputs()
        self.outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or inputs[0].name != "image" or not {"boxes", "scores", "labels"} <= set(self.outputs):
            raise ValueError(f"--onnx {str(path)!r} is not a `resnet-det export` detector: inputs "
                             f"{[i.name for i in inputs]}, outputs {self.outputs} (expected image -> boxes, scores, "
                             "labels[, masks])")

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, {"image": np.ascontiguousarray(image, np.uint8)})))


# ------------------------------------------------------------------------------------------- COCO
def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a binary `(H, W)` mask (column-major runs, pycocotools' string encoding)."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]  # runs start with a (possibly empty) run of zeros
    chars = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]  # pycocotools stores runs after the second as differences
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}


def to_coco(image_id: int, det: dict[str, np.ndarray], label_to_cat_id: dict[int, int] | None = None
            ) -> list[dict[str, Any]]:
    """One COCO result dict per detection: bbox `[x, y, w, h]` (and `segmentation` where masks > 0.5)."""
    out = []
    for k in range(len(det["scores"])):
        x1, y1, x2, y2 = (float(v) for v in det["boxes"][k])
        label = int(det["labels"][k])
        r = {"image_id": image_id, "category_id": label_to_cat_id.get(label, label) if label_to_cat_id else label,
             "score": float(det["scores"][k]), "bbox": [x1, y1, x2 - x1, y2 - y1]}
        if "masks" in det:
            r["segmentation"] = rle_encode(det["masks"][k, 0] > 0.5)
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------ drawing
def draw(image: np.ndarray, det: dict[str, np.ndarray], *, class_names: Sequence[str] | None = None,
         score_thresh: float = 0.5) -> Image.Image:
    """The detections scored >= `score_thresh` on the image: masks blended, boxes, `name score` labels."""
    keep = np.flatnonzero(det["scores"] >= score_thresh)
    canvas = image.astype(np.float32)
    if "masks" in det:
        for k in keep:
            colour = np.array(PALETTE[int(det["labels"][k]) % len(PALETTE)], dtype=np.float32)
            m = det["masks"][k, 0] > 0.5
            canvas[m] = 0.5 * canvas[m] + 0.5 * colour
    pil = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(pil)
    for k in keep:
        label = int(det["labels"][k])
        colour = PALETTE[label % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in det["boxes"][k])
        pen.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        name = class_names[label] if class_names and label < len(class_names) else str(label)
        text = f"{name} {float(det['scores'][k]):.2f}"
        left, top, right, bottom = pen.textbbox((x1, y1), text)
        ty = max(0.0, y1 - (bottom - top) - 2)
        pen.rectangle([x1, ty, x1 + (right - left) + 4, ty + (bottom - top) + 2], fill=colour)
        pen.text((x1 + 2, ty), text, fill=(0, 0, 0))
    return pil


# ------------------------------------------------------------------------------------------ progress
class Progress:
    """A one-line progress bar on stderr (a terminal only, unless forced), without tqdm."""

    def __init__(self, total: int, *, enabled: bool = True, desc: str = "infer") -> None:
        self.total, self.done, self.desc, self.start = total, 0, desc, time.perf_counter()
        self.enabled = enabled and sys.stderr.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            width = 30
            filled = int(width * self.done / max(1, self.total))
            rate = self.done / max(1e-9, time.perf_counter() - self.start)
            sys.stderr.write(f"\r{self.desc}: [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                             f"{rate:.1f} img/s")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def read_class_names(path: str) -> tuple[list[str], dict[int, int] | None]:
    """Class names from a JSON list (background first) or a COCO annotations file (+ label -> category id)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and "categories" in data:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        return ["background"] + [c["name"] for c in cats], {i + 1: c["id"] for i, c in enumerate(cats)}
    if not isinstance(data, list):
        raise ValueError(f"--class-names {path}: expected a JSON list of names or a COCO annotations file")
    return [str(n) for n in data], None


def _write_json(path: Path, data: Any) -> Path:
    """Write through a temporary file and a rename, so a killed run never leaves half a results file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    Path(tmp).rename(path)
    return path


def run_onnx_inference(model: str | Path, inputs: Iterable[str | Path], output_dir: str | Path, *,
                       class_names: Sequence[str] | None = None, label_to_cat_id: dict[int, int] | None = None,
                       score_thresh: float = 0.5, progress: bool = True, threads: int | None = None) -> Path:
    """Run `model` (an ONNX file from `resnet-det export`) on every image: `<output_dir>/results.json` (COCO
    results, every detection) and `<output_dir>/vis/<name>.jpg` (those >= `score_thresh` drawn)."""
    paths = list_images(list(inputs))
    detector = OnnxDetector(model, threads=threads)
    out = Path(output_dir)
    (out / "vis").mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    bar = Progress(len(paths), enabled=progress)
    for i, path in enumerate(paths):
        image = load_image(path)
        det = detector(image)
        results.extend(to_coco(image_id_of(path, i), det, label_to_cat_id))
        draw(image, det, class_names=class_names, score_thresh=score_thresh).save(out / "vis" / f"{path.stem}.jpg",
                                                                                  quality=92)
        bar.update(1)
    return _write_json(out / "results.json", results)

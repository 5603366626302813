"""Helpers for the evaluation tests: synthetic model outputs on tiny COCO, and pycocotools run directly.

Importable as ``evalhelpers`` (pytest's ``pythonpath`` setting puts this folder on ``sys.path``, which
``torch.multiprocessing.spawn`` children inherit).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def quiet_coco(path: str | Path) -> COCO:
    """``COCO(path)`` without the prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def label_maps(coco: COCO) -> tuple[dict[int, int], dict[int, int]]:
    """(contiguous label -> category id, category id -> contiguous label), labels 1..K by sorted id."""
    cats = sorted(coco.getCatIds())
    l2c = {i + 1: c for i, c in enumerate(cats)}
    return l2c, {c: lab for lab, c in l2c.items()}


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion."""
    m = np.pad(mask, 1)
    out = np.ones_like(mask)
    h, w = mask.shape
    for dy in range(3):
        for dx in range(3):
            out &= m[dy : dy + h, dx : dx + w]
    return out


def perfect_outputs(
    coco: COCO, *, with_masks: bool = False
) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
    """GT boxes (and masks) of every non-crowd annotation, score 1, contiguous labels."""
    _, c2l = label_maps(coco)
    img_ids, outputs = [], []
    for img_id in sorted(coco.getImgIds()):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])) if not a["iscrowd"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        out = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([c2l[a["category_id"]] for a in anns], dtype=torch.int64),
        }
        if with_masks:
            img = coco.imgs[img_id]
            masks = [coco.annToMask(a) for a in anns]
            out["masks"] = torch.from_numpy(
                np.stack(masks) if masks else np.zeros((0, img["height"], img["width"]), np.uint8)
            )
        img_ids.append(img_id)
        outputs.append(out)
    return img_ids, outputs


def synthetic_outputs(
    coco: COCO, *, seed: int = 0, with_masks: bool = False
) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
    """Imperfect detections: jittered GT boxes (some dropped, some relabelled) plus false positives.

    Masks: the GT mask shifted by a few pixels, eroded for some; false positives get box masks.
    """
    rng = np.random.default_rng(seed)
    l2c, c2l = label_maps(coco)
    n_labels = len(l2c)
    img_ids, outputs = [], []
    for img_id in sorted(coco.getImgIds()):
        img = coco.imgs[img_id]
        h, w = img["height"], img["width"]
        boxes, scores, labels, masks = [], [], [], []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
            if a["iscrowd"] or rng.random() < 0.15:
                continue
            x, y, bw, bh = a["bbox"]
            jx, jy = rng.normal(0, 0.08, 2) * (bw, bh)
            sw, sh = np.exp(rng.normal(0, 0.1, 2))
            x1, y1 = np.clip(x + jx, 0, w - 1), np.clip(y + jy, 0, h - 1)
            x2, y2 = np.clip(x1 + bw * sw, x1 + 0.5, w), np.clip(y1 + bh * sh, y1 + 0.5, h)
            label = c2l[a["category_id"]] if rng.random() > 0.1 else int(rng.integers(1, n_labels + 1))
            boxes.append([x1, y1, x2, y2])
            scores.append(rng.uniform(0.3, 1.0))
            labels.append(label)
            if with_masks:
                m = _shift(coco.annToMask(a), int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
                masks.append(_erode(m) if rng.random() < 0.5 else m)
        for _ in range(3):  # false positives
            x1, y1 = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            x2, y2 = x1 + rng.uniform(5, min(200, w - x1)), y1 + rng.uniform(5, min(200, h - y1))
            boxes.append([x1, y1, x2, y2])
            scores.append(rng.uniform(0.0, 0.7))
            labels.append(int(rng.integers(1, n_labels + 1)))
            if with_masks:
                m = np.zeros((h, w), np.uint8)
                m[int(y1) : int(y2), int(x1) : int(x2)] = 1
                masks.append(m)
        out = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        if with_masks:
            out["masks"] = torch.from_numpy(np.stack(masks)).bool()
        img_ids.append(img_id)
        outputs.append(out)
    return img_ids, outputs


def direct_results(
    img_ids: list[int], outputs: list[dict[str, torch.Tensor]], l2c: dict[int, int], iou_type: str
) -> list[dict[str, Any]]:
    """COCO results built here, independently of the evaluator (xyxy -> xywh, masks -> RLE)."""
    results = []
    for img_id, out in zip(img_ids, outputs):
        boxes = out["boxes"].tolist()
        for i, (score, label) in enumerate(zip(out["scores"].tolist(), out["labels"].tolist())):
            r: dict[str, Any] = {"image_id": img_id, "category_id": l2c[label], "score": score}
            if iou_type == "bbox":
                x1, y1, x2, y2 = boxes[i]
                r["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                m = np.asfortranarray(out["masks"][i].numpy().astype(np.uint8))
                rle = mask_util.encode(m)
                rle["counts"] = rle["counts"].decode("ascii")
                r["segmentation"] = rle
            results.append(r)
    return results


def pycocotools_direct(
    gt_path: str | Path, results: list[dict[str, Any]] | str | Path, iou_type: str
) -> tuple[np.ndarray, list[str], COCOeval]:
    """Plain pycocotools on a fresh GT: returns stats, the lines summarize() printed, the COCOeval."""
    gt = quiet_coco(gt_path)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        res = results if isinstance(results, (str, Path)) else json.loads(json.dumps(results))
        dt = gt.loadRes(str(res) if isinstance(res, Path) else res)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.summarize()
    return np.asarray(ev.stats), buf.getvalue().splitlines(), ev


def table_lines(text: str) -> list[str]:
    """The pycocotools summary lines in printed text."""
    return [ln for ln in text.splitlines() if ln.startswith((" Average Precision", " Average Recall"))]


def semseg_batch(
    seed: int, num_classes: int = 5, n: int = 3, size: tuple[int, int] = (24, 32)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (prediction, target) label maps: predictions agree with the target ~60% of the time,
    ~10% of the target pixels are ignore (255)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (n, *size), generator=g)
    pred = torch.where(
        torch.rand(n, *size, generator=g) < 0.6,
        target,
        torch.randint(0, num_classes, (n, *size), generator=g),
    )
    target[torch.rand(n, *size, generator=g) < 0.1] = 255
    return pred, target


def dist_worker(rank: int, world_size: int, init_file: str, out_dir: str, gt_path: str) -> None:
    """One rank of the gloo test: half of the images (one image on both ranks) and its own seg batch."""
    import torch.distributed as dist

    from resnet_det.evaluation import COCOEvaluator, DatasetEvaluators, SemSegEvaluator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        gt = quiet_coco(gt_path)
        ids, outs = synthetic_outputs(gt, seed=0)
        half = len(ids) // 2
        sel = range(0, half + 1) if rank == 0 else range(half, len(ids))  # image `half` on both ranks
        evaluator = COCOEvaluator(gt_path, label_to_cat_id=label_maps(gt)[0])
        evaluator.process([ids[i] for i in sel], [outs[i] for i in sel])
        coco_metrics = evaluator.evaluate()

        sem = SemSegEvaluator(5)
        pred, target = semseg_batch(seed=rank)
        sem.process([{"sem_seg": t} for t in target], [{"sem_seg": p} for p in pred])
        sem_metrics = sem.evaluate()

        # Both through the list evaluator: inputs are the targets (image_id and sem_seg), in one call.
        both = DatasetEvaluators([COCOEvaluator(gt_path, label_to_cat_id=label_maps(gt)[0]), SemSegEvaluator(5)])
        inputs = [{"image_id": ids[i], "sem_seg": t} for i, t in zip(sel, target)]
        outputs = [{**outs[i], "sem_seg": p} for i, p in zip(sel, pred)]
        both.process(inputs, outputs)
        report = {"coco": coco_metrics, "sem": sem_metrics, "local_cm": sem.confusion_matrix.tolist(),
                  "both_keys": sorted(both.evaluate())}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def dist_shard_worker(rank: int, world_size: int, init_file: str, out_dir: str, gt_path: str) -> None:
    """One rank of the sharded evaluation: images dealt round-robin (image 0 also on the last rank, as a
    padding sampler repeats it), bbox and segm, shards in ``out_dir/eval``; records what went through
    ``all_gather_object``."""
    import torch.distributed as dist

    import resnet_det.evaluation.coco as coco_module
    from resnet_det.evaluation import COCOEvaluator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    gathered: list[Any] = []
    real = coco_module.all_gather_object

    def recording(obj: Any) -> list[Any]:
        gathered.append(obj)
        return real(obj)

    coco_module.all_gather_object = recording
    try:
        gt = quiet_coco(gt_path)
        ids, outs = synthetic_outputs(gt, seed=0, with_masks=True)
        sel = [i for i in range(len(ids)) if i % world_size == rank] + ([0] if rank == world_size - 1 else [])
        evaluator = COCOEvaluator(gt_path, iou_types=("bbox", "segm"), label_to_cat_id=label_maps(gt)[0],
                                  output_dir=Path(out_dir) / "eval")
        evaluator.process([ids[i] for i in sel], [outs[i] for i in sel])
        metrics = evaluator.evaluate()
        report = {"metrics": metrics, "gathered": [repr(g) for g in gathered], "images": len(sel)}
        (Path(out_dir) / f"shard_rank{rank}.json").write_text(json.dumps(report))
    finally:
        coco_module.all_gather_object = real
        dist.destroy_process_group()

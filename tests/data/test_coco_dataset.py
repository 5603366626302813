"""CocoDetection on real COCO data (tiny_coco): labels, crowd, masks, empty images, unreadable files."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from resnet_det.data.coco import CocoDetection, DatasetError
from resnet_det.data.images import load_image
from resnet_det.data.transforms import boxes_from_masks

CROWD_IMAGE = 184613  # has one crowd RLE annotation


def make(root: Path, **kwargs) -> CocoDetection:
    kwargs.setdefault("training", True)
    return CocoDetection(root / "images", root / "annotations.json", **kwargs)


def test_categories_map_to_contiguous_labels_and_back(tiny_coco_src: Path) -> None:
    ds = make(tiny_coco_src)
    raw = json.loads((tiny_coco_src / "annotations.json").read_text())
    cat_ids = sorted(c["id"] for c in raw["categories"])
    assert ds.num_classes == 80 and ds.num_labels == 81 and len(ds.class_names) == 81
    assert ds.class_names[0] == "background"
    assert ds.label_to_cat_id == {i + 1: c for i, c in enumerate(cat_ids)}
    assert ds.cat_id_to_label[90] == 80 and ds.class_names[80] == "toothbrush"
    assert ds.class_names[1] == "person"
    for label, cid in ds.label_to_cat_id.items():
        assert ds.cat_id_to_label[cid] == label
    # every target's labels map back to the annotation category ids, in annotation order
    for i in range(0, len(ds), 5):
        _, target = ds[i]
        anns = [a for a in ds.coco.imgToAnns[target["image_id"]] if not a["iscrowd"]]
        back = [ds.label_to_cat_id[int(v)] for v in target["labels"]]
        assert back == [a["category_id"] for a in anns]
        assert int(target["labels"].min()) >= 1 and int(target["labels"].max()) <= 80


def test_non_contiguous_ids_are_labels(tiny_coco_src: Path) -> None:
    ds = make(tiny_coco_src, contiguous_ids=False)
    assert ds.num_classes == 80 and ds.num_labels == 91
    assert ds.class_names[90] == "toothbrush" and ds.class_names[12] == "N/A"
    assert all(k == v for k, v in ds.label_to_cat_id.items())
    _, target = ds[ds.ids.index(CROWD_IMAGE)]
    anns = [a for a in ds.coco.imgToAnns[CROWD_IMAGE] if not a["iscrowd"]]
    assert target["labels"].tolist() == [a["category_id"] for a in anns]


def test_item_layout_and_types(tiny_coco_src: Path) -> None:
    ds = make(tiny_coco_src, with_masks=True, with_semantic=True)
    image, target = ds[0]
    info = ds.coco.imgs[ds.ids[0]]
    h, w = info["height"], info["width"]
    assert image.dtype == torch.float32 and image.shape == (3, h, w)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    ref = load_image(tiny_coco_src / "images" / info["file_name"])
    # measured: 0 (the same decoded pixels / 255); assert_close's fp32 defaults
    torch.testing.assert_close(image, torch.from_numpy(ref).permute(2, 0, 1).float() / 255)
    k = len(target["labels"])
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (k, 4)
    assert target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (k, h, w)
    assert target["sem_seg"].dtype == torch.int64 and target["sem_seg"].shape == (h, w)
    assert isinstance(target["image_id"], int) and target["image_id"] == ds.ids[0]
    assert target["orig_size"] == (h, w) and all(isinstance(v, int) for v in target["orig_size"])
    b = target["boxes"]
    assert bool((b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all())  # xyxy


def test_crowd_excluded_from_targets(tiny_coco_src: Path) -> None:
    ds = make(tiny_coco_src, with_masks=True, with_semantic=True)
    anns = ds.coco.imgToAnns[CROWD_IMAGE]
    crowd = [a for a in anns if a["iscrowd"]]
    assert len(crowd) == 1 and ds.report.num_crowd == 1
    _, target = ds[ds.ids.index(CROWD_IMAGE)]
    assert len(target["boxes"]) == len(anns) - 1 == len(target["masks"])
    cx, cy, cw, ch = crowd[0]["bbox"]
    crowd_xyxy = torch.tensor([cx, cy, cx + cw, cy + ch], dtype=torch.float32)
    # measured: the nearest box is 174 px from the crowd box (in its worst coordinate)
    assert not any(torch.allclose(b, crowd_xyxy) for b in target["boxes"])
    # the crowd region is "ignore" in the semantic target where no instance covers it
    sem = target["sem_seg"]
    assert (sem == 255).sum() > 1000
    covered = (target["masks"] > 0).any(0)
    assert not bool((sem[covered] == 255).any())


def test_polygon_masks_match_annotation_boxes(tiny_coco_src: Path) -> None:
    ds = make(tiny_coco_src, with_masks=True)
    diffs = []
    for i in range(len(ds)):
        _, target = ds[i]
        mb = boxes_from_masks(target["masks"].numpy())
        b = target["boxes"].numpy()
        # the rasterised polygon never leaves its annotation box (1 px rounding) ...
        assert (mb[:, :2] >= b[:, :2] - 1).all() and (mb[:, 2:] <= b[:, 2:] + 1).all()
        diffs.append(np.abs(mb - b).max(1))
    d = np.concatenate(diffs)
    assert len(d) == 196
    # ... and matches it within 2 px except thin polygon tips lost by rasterisation
    assert (d <= 2.0).mean() >= 0.95, np.percentile(d, [50, 90, 99, 100])


def test_semantic_from_instances_uses_labels(tiny_coco_src: Path) -> None:
    ds = make(tiny_coco_src, with_masks=True, with_semantic=True)
    _, target = ds[3]
    sem, masks, labels = target["sem_seg"], target["masks"], target["labels"]
    present = set(torch.unique(sem).tolist()) - {0, 255}
    assert present <= set(labels.tolist()) and present
    # a pixel covered by exactly one instance carries that instance's label
    single = masks.sum(0) == 1
    owner = masks.float().argmax(0)
    assert torch.equal(sem[single], labels[owner[single]])
    uncovered = sem[masks.sum(0) == 0]
    assert bool(((uncovered == 0) | (uncovered == 255)).all())


def test_keep_empty_defaults(tiny_coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann = tiny_coco / "annotations.json"
    data = json.loads(ann.read_text())
    src = data["images"][0]
    shutil.copy(tiny_coco / "images" / src["file_name"], tiny_coco / "images" / "empty.jpg")
    data["images"].append({**src, "id": 1, "file_name": "empty.jpg"})
    ann.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="resnet_det.data.coco"):
        train = make(tiny_coco, training=True, with_masks=True)
    assert 1 not in train.ids and len(train) == 16
    assert train.report.skipped == {"image_without_annotations": 1}
    assert "[image_without_annotations]" in caplog.records[-1].getMessage()
    test = make(tiny_coco, training=False, with_masks=True)
    assert test.ids[0] == 1 and len(test) == 17
    _, target = test[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, src["height"], src["width"])
    kept = make(tiny_coco, training=True, keep_empty=True)
    assert 1 in kept.ids


def test_aspect_ratios_come_from_json(tiny_coco: Path) -> None:
    ds = make(tiny_coco)
    shutil.rmtree(tiny_coco / "images")  # no image may be opened
    ratios = ds.aspect_ratios()
    assert ratios == [ds.coco.imgs[i]["width"] / ds.coco.imgs[i]["height"] for i in ds.ids]
    assert any(r < 1 for r in ratios) and any(r > 1 for r in ratios)


def test_unreadable_image_is_skipped_and_counted(tiny_coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = make(tiny_coco)
    bad = ds.image_info(2)["file_name"]
    (tiny_coco / "images" / bad).write_bytes(b"\xff\xd8 corrupt jpeg")
    with caplog.at_level(logging.WARNING, logger="resnet_det.data.coco"):
        _, target = ds[2]
    assert target["image_id"] == ds.ids[3]  # the next readable image, not a zero image
    assert ds.num_unreadable == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and bad in warnings[0]
    caplog.clear()
    _, again = ds[2]
    assert again["image_id"] == ds.ids[3] and ds.num_unreadable == 1
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # warned once
    _, last = ds[1]
    assert last["image_id"] == ds.ids[1]


def test_size_mismatch_is_skipped(tiny_coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann = tiny_coco / "annotations.json"
    data = json.loads(ann.read_text())
    ds0 = make(tiny_coco)
    target_id = ds0.ids[-1]
    for im in data["images"]:
        if im["id"] == target_id:
            im["height"] += 7
    ann.write_text(json.dumps(data))
    ds = make(tiny_coco)
    with caplog.at_level(logging.WARNING, logger="resnet_det.data.coco"):
        _, target = ds[len(ds) - 1]
    assert target["image_id"] == ds.ids[0]  # wrapped around to the first image
    assert ds.num_unreadable == 1
    assert "on disk but" in caplog.records[-1].getMessage()


def test_all_images_unreadable_raises(tiny_coco: Path) -> None:
    ds = make(tiny_coco)
    shutil.rmtree(tiny_coco / "images")
    with pytest.raises(DatasetError, match="none of the 16 images could be read"):
        ds[0]
    assert ds.num_unreadable == 16


def test_cleaned_coco_is_usable_by_pycocotools_eval(tiny_coco_src: Path) -> None:
    ds = make(tiny_coco_src, training=False)
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in ds.coco.dataset["annotations"]
        if not a["iscrowd"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        res = ds.coco.loadRes(dets)
        ev = COCOeval(ds.coco, res, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0, abs=1e-14)  # measured: 0 (pycocotools' eps could make it 1 - 2e-16)


def test_semantic_root_requires_with_semantic(tiny_coco_src: Path) -> None:
    with pytest.raises(DatasetError, match="with_semantic=True"):
        make(tiny_coco_src, semantic_root=tiny_coco_src)

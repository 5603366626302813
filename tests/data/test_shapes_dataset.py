"""Synthetic shapes: determinism, layout, masks/boxes/semantic consistency, occlusion rule,
atomic writing, cache, CLI, and loading through CocoDetection."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

import resnet_det.data.shapes as shapes_mod
from resnet_det.data.coco import CocoDetection
from resnet_det.data.shapes import (
    DEFAULT_CLASSES,
    OutputExistsError,
    default_cache_root,
    ensure_shapes,
    make_shapes,
    render_image,
    shapes_paths,
)
from resnet_det.data.transforms import boxes_from_masks, build_transforms

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(num_train=20, num_val=6, image_size=96, seed=0)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "ds", **SMALL)


def load_json(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def decode(ann: dict) -> np.ndarray:
    with warnings.catch_warnings():  # pycocotools vs numpy 2 (copy keyword)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(ann["segmentation"])


# -------------------------------------------------------------------------------------- layout
def test_layout_and_split_sizes(shapes_root: Path) -> None:
    for split, n in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        data = load_json(shapes_root, split)
        assert [im["id"] for im in data["images"]] == list(range(1, n + 1))
        assert sorted(p.name for p in (shapes_root / split).iterdir()) == [f"{i:06d}.jpg" for i in range(1, n + 1)]
        assert len(list((shapes_root / "semantic" / split).glob("*.png"))) == n
        assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
        assert data["categories"] == [
            {"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(DEFAULT_CLASSES)
        ]
        assert all(a["iscrowd"] == 0 for a in data["annotations"])
        per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=n + 1)[1:]
        assert per_image.min() >= 1 and per_image.max() <= 4
        for im in data["images"]:
            assert (im["height"], im["width"]) == (96, 96)
            with Image.open(shapes_root / split / im["file_name"]) as f:
                assert f.size == (96, 96) and f.mode == "RGB"
    meta = json.loads((shapes_root / "meta.json").read_text())
    assert meta["params"]["seed"] == 0 and meta["splits"]["val"]["images"] == SMALL["num_val"]
    assert meta["classes"] == list(DEFAULT_CLASSES)


def test_all_classes_sizes_and_positions_vary(shapes_root: Path) -> None:
    anns = load_json(shapes_root, "train")["annotations"]
    assert {a["category_id"] for a in anns} == {1, 2, 3, 4}
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in anns]
    assert min(sides) < 0.25 * 96 and max(sides) > 0.4 * 96
    xs = [a["bbox"][0] for a in anns]
    assert min(xs) < 20 and max(xs) > 50


def test_masks_boxes_and_areas_are_consistent(shapes_root: Path) -> None:
    data = load_json(shapes_root, "train")
    by_image: dict[int, list[np.ndarray]] = {}
    for a in data["annotations"]:
        m = decode(a)
        assert m.shape == (96, 96) and m.any()
        np.testing.assert_array_equal(boxes_from_masks(m[None])[0], [a["bbox"][0], a["bbox"][1],
                                                                    a["bbox"][0] + a["bbox"][2],
                                                                    a["bbox"][1] + a["bbox"][3]])
        assert a["area"] == float(m.sum())
        by_image.setdefault(a["image_id"], []).append(m)
    for masks in by_image.values():
        assert np.stack(masks).sum(0).max() <= 1  # visible parts do not overlap


def test_semantic_png_matches_instance_masks(shapes_root: Path) -> None:
    data = load_json(shapes_root, "val")
    for im in data["images"]:
        sem = np.asarray(Image.open(shapes_root / "semantic" / "val" / im["file_name"].replace(".jpg", ".png")))
        assert sem.dtype == np.uint8 and sem.shape == (96, 96)
        expected = np.zeros((96, 96), dtype=np.uint8)
        for a in data["annotations"]:
            if a["image_id"] == im["id"]:
                expected[decode(a) > 0] = a["category_id"]
        np.testing.assert_array_equal(sem, expected)


def test_shapes_are_visible_in_the_pixels(shapes_root: Path) -> None:
    # each instance differs from the pixels around it (contrast with the background)
    data = load_json(shapes_root, "val")
    contrasts = []
    for a in data["annotations"]:
        img = np.asarray(Image.open(shapes_root / "val" / f"{a['image_id']:06d}.jpg")).astype(float)
        m = decode(a).astype(bool)
        ring = np.zeros_like(m)
        x, y, w, h = (int(v) for v in a["bbox"])
        ring[max(y - 3, 0) : y + h + 3, max(x - 3, 0) : x + w + 3] = True
        ring &= ~m
        if ring.sum() > 20:
            contrasts.append(np.linalg.norm(img[m].mean(0) - img[ring].mean(0)))
    assert np.median(contrasts) > 40


# ------------------------------------------------------------------------------ occlusion rule
def test_hardly_visible_shapes_are_dropped_and_not_drawn() -> None:
    dropped = 0
    for seed in range(40):
        stats: list[dict] = []
        image, instances = render_image(np.random.default_rng(seed), 80, 80, min_shapes=6, max_shapes=8,
                                        min_rel_size=0.3, max_rel_size=0.6, stats=stats)
        kept = [s for s in stats if s["kept"]]
        assert len(kept) == len(instances)
        owned = np.zeros((80, 80), dtype=int)
        for s, (label, mask) in zip(kept, instances):
            assert s["label"] == label
            assert mask.sum() == s["visible_area"] >= 0.4 * s["full_area"]
            assert not (mask & ~s["full_mask"].astype(bool)).any()
            owned += mask
        assert owned.max() <= 1
        # The background is the first thing drawn from the generator: re-create it to check that a
        # dropped shape left no pixels (only the final sensor noise differs there).
        background = shapes_mod._background(np.random.default_rng(seed), 80, 80)
        kept_full = np.zeros((80, 80), dtype=bool)
        for s in kept:
            kept_full |= s["full_mask"].astype(bool)
        for s in stats:
            if not s["kept"]:
                dropped += 1
                assert s["visible_area"] < 0.4 * s["full_area"]
                region = s["full_mask"].astype(bool) & ~kept_full
                if region.sum() > 10:
                    diff = np.abs(image[region].astype(float) - background[region]).mean()
                    assert diff < 8, diff
        for s in kept:  # whereas a drawn shape does change its pixels
            region = s["full_mask"].astype(bool)
            assert np.abs(image[region].astype(float) - background[region]).mean() > 15
    assert dropped > 5


def test_fully_visible_with_min_visible_one() -> None:
    for seed in range(10):
        stats: list[dict] = []
        render_image(np.random.default_rng(seed), 80, 80, min_shapes=5, max_shapes=6, min_visible=1.0,
                     stats=stats)
        for s in (s for s in stats if s["kept"]):
            assert s["visible_area"] == s["full_area"]


# ------------------------------------------------------------------------------- determinism
def test_same_seed_is_identical_different_seed_differs(tmp_path: Path, shapes_root: Path) -> None:
    again = make_shapes(tmp_path / "again", **SMALL)
    other = make_shapes(tmp_path / "other", **{**SMALL, "seed": 1})
    for name in ("annotations/instances_train.json", "annotations/instances_val.json", "meta.json"):
        assert (again / name).read_bytes() == (shapes_root / name).read_bytes()
    assert (other / "annotations/instances_train.json").read_bytes() != (
        shapes_root / "annotations/instances_train.json").read_bytes()
    for rel in ("train/000001.jpg", "val/000006.jpg", "semantic/train/000003.png"):
        a, b = np.asarray(Image.open(again / rel)), np.asarray(Image.open(shapes_root / rel))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(np.asarray(Image.open(other / rel)), b)


def test_random_image_sizes(tmp_path: Path) -> None:
    root = make_shapes(tmp_path / "var", num_train=12, num_val=2, image_size=64, max_image_size=128, seed=3)
    sizes = {(im["height"], im["width"]) for im in load_json(root, "train")["images"]}
    assert len(sizes) > 5 and all(64 <= h <= 128 and 64 <= w <= 128 for h, w in sizes)
    for im in load_json(root, "train")["images"][:3]:
        with Image.open(root / "train" / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])


# --------------------------------------------------------------------------- through the dataset
def test_loads_through_coco_detection(shapes_root: Path) -> None:
    paths = shapes_paths(shapes_root, "train")
    ds = CocoDetection(paths["image_root"], paths["ann_file"], training=True, with_masks=True,
                       with_semantic=True, semantic_root=paths["semantic_root"])
    from_instances = CocoDetection(paths["image_root"], paths["ann_file"], training=True, with_masks=True,
                                   with_semantic=True)
    assert len(ds) == SMALL["num_train"] and ds.num_classes == 4 and ds.report.skipped == {}
    assert ds.class_names == ["background", *DEFAULT_CLASSES]
    for i in range(0, len(ds), 4):
        image, target = ds[i]
        assert image.shape == (3, 96, 96)
        np.testing.assert_array_equal(boxes_from_masks(target["masks"].numpy()), target["boxes"].numpy())
        assert torch.equal(target["sem_seg"], from_instances[i][1]["sem_seg"])


@pytest.mark.parametrize(
    "kwargs", [dict(min_size=(64, 128, 160), max_size=300, hflip_prob=0.5), dict(lsj=True, lsj_size=128)]
)
def test_transformed_masks_match_boxes(shapes_root: Path, kwargs: dict) -> None:
    paths = shapes_paths(shapes_root, "val")
    ds = CocoDetection(paths["image_root"], paths["ann_file"], training=True, with_masks=True,
                       with_semantic=True, semantic_root=paths["semantic_root"],
                       transforms=build_transforms(training=True, seed=0, **kwargs))
    for i in range(len(ds)):
        image, target = ds[i]
        masks = target["masks"].numpy()
        assert masks.shape[1:] == image.shape[1:] == target["sem_seg"].shape
        # measured: 1.0 px at most over 12 samples (a resized mask's pixel edges vs the scaled box: geometry)
        np.testing.assert_allclose(boxes_from_masks(masks), target["boxes"].numpy(), atol=2.0)
        for m, label in zip(masks, target["labels"]):
            assert (target["sem_seg"].numpy()[m > 0] == int(label)).mean() > 0.95


# ------------------------------------------------------------------------- atomic write, cache
def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shapes_mod._write_split

    def failing(out: Path, split: str, p: dict, progress: object) -> dict:
        if split == "val":
            raise KeyboardInterrupt
        return real(out, split, p, progress)

    monkeypatch.setattr(shapes_mod, "_write_split", failing)
    with pytest.raises(KeyboardInterrupt):
        make_shapes(tmp_path / "ds", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor a temporary folder


def test_existing_output_requires_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "junk.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="overwrite=True") as info:
        make_shapes(root, num_train=2, num_val=1, image_size=48)
    assert isinstance(info.value, ValueError)
    make_shapes(root, num_train=2, num_val=1, image_size=48, overwrite=True)
    assert not (root / "junk.txt").exists() and (root / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_ensure_shapes_caches_by_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = dict(num_train=3, num_val=2, image_size=48, seed=4)
    first = ensure_shapes(tmp_path, **params)
    assert (first / "meta.json").is_file() and first.parent == tmp_path
    calls = []
    monkeypatch.setattr(shapes_mod, "make_shapes", lambda *a, **k: calls.append(k))
    assert ensure_shapes(tmp_path, **params) == first and calls == []  # cached: not regenerated
    monkeypatch.undo()
    other = ensure_shapes(tmp_path, **{**params, "seed": 5})
    assert other != first and (other / "meta.json").is_file()
    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path / "envcache"))
    assert default_cache_root() == tmp_path / "envcache" / "shapes"
    assert ensure_shapes(**params).parent == tmp_path / "envcache" / "shapes"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_train=0), "num_train"),
        (dict(image_size=8), "image_size"),
        (dict(min_shapes=5, max_shapes=2), "min_shapes"),
        (dict(classes=("circle", "blob")), "classes"),
        (dict(max_image_size=50, image_size=64), "max_image_size"),
    ],
)
def test_bad_parameters(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_shapes(tmp_path / "ds", **kwargs)
    with pytest.raises(ValueError, match=match):
        ensure_shapes(tmp_path, **kwargs)
    assert not (tmp_path / "ds").exists()


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, str(REPO / "tools" / "make_shapes.py"), str(out), "--num-train", "3",
           "--num-val", "2", "--image-size", "48", "--seed", "7"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["params"]["num_train"] == 3 and meta["params"]["seed"] == 7
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr

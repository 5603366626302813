"""Dataset formats (resnet_det.data.formats): the registry, the YOLO and Pascal VOC loaders with their
validation, conversion between layouts, and the synthetic shapes written in those layouts."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_det.config import load_config
from resnet_det.config_files import resolve_config
from resnet_det.data.coco_index import DatasetError
from resnet_det.data.formats import (
    DatasetFormat,
    Source,
    SplitFiles,
    convert,
    format_names,
    get_format,
    register_format,
)
from resnet_det.data.shapes import make_shapes, shapes_paths
from resnet_det.engine.launch import build_dataset, dataset_paths
from resnet_det.tasks.detection import DETECTION

SHAPES_SOURCE = dict(train_images="train", train_annotations="annotations/instances_train.json", val_images="val",
                     val_annotations="annotations/instances_val.json")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "coco", num_train=10, num_val=4, image_size=64, seed=3)


def _cfg(*overrides: str):
    return load_config(resolve_config("shapes/faster_rcnn_R_50_FPN"), list(overrides))


def _counts(tmp_path: Path, fmt: str, split: str) -> dict[str, int]:
    """reason key -> count (skipped and repaired) of the conversion report of ``fmt``'s ``split``."""
    (report,) = (tmp_path / "cache" / "converted").glob(f"{fmt}-{split}-*.report.json")
    d = json.loads(report.read_text())
    return {**d["skipped"], **d["fixed"]}


def _boxes_by_stem(coco: dict) -> dict[str, list[tuple[int, list[float]]]]:
    """file stem (without a split prefix) -> sorted (category name, bbox) of the non-crowd annotations."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    stems = {img["id"]: Path(img["file_name"]).stem.split("_")[-1] for img in coco["images"]}
    out: dict[str, list] = {s: [] for s in stems.values()}
    for a in coco["annotations"]:
        out[stems[a["image_id"]]].append((names[a["category_id"]], a["bbox"]))
    return {k: sorted(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------- registry
def test_the_formats_are_coco_yolo_voc_and_an_unknown_one_is_a_config_error() -> None:
    assert format_names()[:3] == ("coco", "yolo", "voc")
    assert _cfg("data.format=yolo").data.format == "yolo"
    with pytest.raises(ValueError, match=r"data\.format.*'coco', 'yolo', 'voc'"):
        _cfg("data.format=pascal")
    with pytest.raises(ValueError, match="not a dataset format"):
        get_format("pascal")


def test_a_layout_format_without_root_says_how_to_make_one() -> None:
    with pytest.raises(ValueError, match=r"needs data\.root.*make-shapes --format yolo"):
        dataset_paths(_cfg("data.format=yolo"), "train")


def test_a_format_registered_from_outside_is_used_by_the_dataset_builder(shapes: Path) -> None:
    seen = []

    def resolve(data, split: str) -> SplitFiles:
        seen.append((data.root, split))
        p = shapes_paths(Path(data.root), split)
        return SplitFiles(p["image_root"], p["ann_file"])

    fmt = register_format(DatasetFormat("test_mine", layout="the shapes folder", resolve=resolve))
    assert register_format(fmt) is fmt  # the same object again is harmless
    with pytest.raises(ValueError, match="registered twice"):
        register_format(DatasetFormat("test_mine", layout="", resolve=resolve))
    ds = build_dataset(_cfg("data.format=test_mine", f"data.root={shapes}"), DETECTION, "val")
    assert seen == [(str(shapes), "val")] and len(ds) == 4


# ------------------------------------------------------------------------------------ shapes round trip
@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_shapes_written_in_a_layout_load_back_to_the_coco_boxes(fmt: str, shapes: Path, tmp_path: Path) -> None:
    out = convert(Source(root=str(shapes), **SHAPES_SOURCE), "coco", fmt, tmp_path / fmt)
    for split in ("train", "val"):
        original = json.loads((shapes / "annotations" / f"instances_{split}.json").read_text())
        ds = build_dataset(_cfg(f"data.format={fmt}", f"data.root={out}"), DETECTION, split)
        names = [c["name"] for c in original["categories"]]
        # VOC has no class list: its names come back sorted; YOLO's data.yaml keeps the order.
        assert ds.class_names == ["background", *(sorted(names) if fmt == "voc" else names)]
        got, want = _boxes_by_stem(ds.coco.dataset), _boxes_by_stem(original)
        assert got.keys() == want.keys() and sum(map(len, want.values())) > 0
        for stem in want:
            assert [n for n, _ in got[stem]] == [n for n, _ in want[stem]], stem
            # YOLO stores 8 decimals of a normalised coordinate, VOC 4 decimals of a pixel: measured 0 on these 28
            # images (an earlier measurement saw 5e-5 px); atol 1e-4 covers that rounding.
            np.testing.assert_allclose([b for _, b in got[stem]], [b for _, b in want[stem]], atol=1e-4)


@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_convert_output_evaluates_to_the_native_loaders_ap(fmt: str, shapes: Path, tmp_path: Path) -> None:
    from pycocotools.cocoeval import COCOeval

    layout = convert(Source(root=str(shapes), **SHAPES_SOURCE), "coco", fmt, tmp_path / fmt)
    coco_dir = convert(Source(root=str(layout)), fmt, "coco", tmp_path / "as_coco", ["val"])
    native = build_dataset(_cfg(f"data.format={fmt}", f"data.root={layout}"), DETECTION, "val").coco
    converted = build_dataset(_cfg(f"data.root={coco_dir}"), DETECTION, "val").coco
    rng = np.random.default_rng(0)
    stats = []
    for gt in (native, converted):
        dets = []
        for a in gt.dataset["annotations"]:  # ground truth, jittered: an AP strictly between 0 and 1
            x, y, w, h = a["bbox"]
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                         "bbox": [x + float(rng.normal(0, 2)), y + float(rng.normal(0, 2)), w, h]})
        rng = np.random.default_rng(0)
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats.append(ev.stats)
    assert 0 < stats[0][0] < 1
    np.testing.assert_array_equal(stats[0], stats[1])


# ------------------------------------------------------------------------------------------ YOLO input
def _jpg(path: Path, w: int = 40, h: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)
    return path


def _yolo(root: Path, labels: dict[str, str | None], names=("a", "b")) -> Path:
    (root / "data.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(f"train: images/train\nval: images/train\nnames: {list(names)}\n")
    for stem, text in labels.items():
        _jpg(root / "images" / "train" / f"{stem}.jpg")
        if text is not None:
            (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
            (root / "labels" / "train" / f"{stem}.txt").write_text(text)
    return root


def test_yolo_label_lines_are_validated_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _yolo(tmp_path / "y", {
        "good": "0 0.5 0.5 0.5 0.5\n1 0.1 0.1 0.9 0.1 0.5 0.9\n",       # a box (40x20 image) and a triangle
        "bad": ("0 0.5 0.5 0.5\n"                  # 4 values
                "0 a 0.5 0.5 0.5\n"                # not a number
                "2 0.5 0.5 0.5 0.5\n"              # class out of range (nc=2)
                "0.5 0.5 0.5 0.5 0.5\n"            # class not an integer
                "0 0.5 0.5 2.0 0.5\n"              # far outside 0..1
                "1 0.5 0.5 1.01 0.5\n"             # 0.005 outside: clipped
                "0 0.5 0.5 0 0.5\n"                # zero width
                "0 0.2 0.2 0.2 0.2\n0 0.2 0.2 0.2 0.2\n"),  # the same line twice
        "background": None,                        # no label file
    })
    os.mkfifo(root / "images" / "train" / "pipe.jpg")  # must be skipped without being opened (never blocks)
    (root / "images" / "train" / "broken.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.INFO):
        ds = build_dataset(_cfg("data.format=yolo", f"data.root={root}", "data.keep_empty_train=true"), DETECTION,
                           "train")
    gt = ds.coco.dataset
    conv = next(r for r in caplog.records if "converted to" in r.getMessage()).getMessage()
    assert "label lines with neither 5 values" in conv
    assert _counts(tmp_path, "yolo", "train") == {
        "yolo_unreadable_image": 2, "yolo_field_count": 1, "yolo_not_a_number": 1, "yolo_class_out_of_range": 2,
        "yolo_outside_image": 1, "yolo_empty_box": 1, "yolo_duplicate_line": 1, "yolo_missing_label_file": 1,
        "yolo_clipped": 1}
    files = {img["id"]: img["file_name"] for img in gt["images"]}
    assert sorted(files.values()) == ["background.jpg", "bad.jpg", "good.jpg"]
    by_file = {}
    for a in gt["annotations"]:
        by_file.setdefault(files[a["image_id"]], []).append(a)
    box, tri = sorted(by_file["good.jpg"], key=lambda a: a["category_id"])
    # measured: 0 on the five lines below (1.8e-15 on the clipped widths); the defaults, rtol 1e-7
    np.testing.assert_allclose(box["bbox"], [10, 5, 20, 10])
    np.testing.assert_allclose(tri["bbox"], [4, 2, 32, 16])  # the polygon's extent
    np.testing.assert_allclose(tri["segmentation"][0], [4, 2, 36, 2, 20, 18])
    assert tri["area"] == pytest.approx(0.5 * 32 * 16)
    np.testing.assert_allclose(sorted(a["bbox"][2] for a in by_file["bad.jpg"]), [8, 40])  # the clipped box: 40


@pytest.mark.parametrize(("yaml_text", "match"), [
    (None, "data.yaml does not exist"),
    ("train: images/train\nval: images/train\n", "`names` must be"),
    ("train: images/train\nval: images/train\nnames: [a, b]\nnc: 3\n", "nc=3 but names has 2"),
    ("train: images/train\nnames: [a]\n", "no `val:` entry"),
    ("train: images/nowhere\nval: images/train\nnames: [a]\n", "nowhere does not exist"),
    (": : :\n", "cannot be read as YAML"),
])
def test_a_bad_data_yaml_is_one_clear_error(yaml_text: str | None, match: str, tmp_path: Path) -> None:
    root = _yolo(tmp_path / "y", {"x": "0 0.5 0.5 0.5 0.5\n"})
    if yaml_text is None:
        (root / "data.yaml").unlink()
    else:
        (root / "data.yaml").write_text(yaml_text)
    with pytest.raises((DatasetError, FileNotFoundError), match=match):
        for split in ("train", "val"):
            build_dataset(_cfg("data.format=yolo", f"data.root={root}"), DETECTION, split)


def test_a_changed_label_file_is_converted_again(tmp_path: Path) -> None:
    root = _yolo(tmp_path / "y", {"x": "0 0.5 0.5 0.5 0.5\n"})
    cfg = _cfg("data.format=yolo", f"data.root={root}")
    assert len(build_dataset(cfg, DETECTION, "val").coco.dataset["annotations"]) == 1
    (root / "labels" / "train" / "x.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.2 0.2 0.1 0.1\n")
    assert len(build_dataset(cfg, DETECTION, "val").coco.dataset["annotations"]) == 2


# ------------------------------------------------------------------------------------------- VOC input
def _voc_xml(objects: str, size: str = "<size><width>40</width><height>20</height><depth>3</depth></size>") -> str:
    return f"<annotation><filename>x.jpg</filename>{size}{objects}</annotation>"


def _obj(name: str, box: tuple, difficult: int = 0) -> str:
    b = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{b}</bndbox></object>"


def test_voc_annotations_are_validated_and_difficult_objects_are_ignore_regions(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "VOC"
    xmls = {
        "a": _voc_xml(_obj("dog", (1, 1, 10, 20)) + _obj("wolf", (5, 5, 15, 15), difficult=1)),
        "nosize": _voc_xml(_obj("dog", (1, 1, 40, 30)), size=""),      # size from the image; box clipped
        "broken": "<annotation><object>",
        "badbox": _voc_xml(_obj("dog", ("a", 1, 5, 5)) + "<object><name>wolf</name></object>"),
        "empty": _voc_xml(_obj("dog", (30, 1, 29, 5))),  # xmax < xmin (xmax == xmin is one pixel wide)
    }
    for stem, text in xmls.items():
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(text)
        _jpg(root / "JPEGImages" / f"{stem}.jpg")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join([*xmls, "missing"]) + "\n")
    with caplog.at_level(logging.INFO):
        ds = build_dataset(_cfg("data.format=voc", f"data.root={root}",
                                "data.train_annotations=ImageSets/Main/train.txt", "data.keep_empty_train=true"),
                           DETECTION, "train")
    conv = next(r for r in caplog.records if "converted to" in r.getMessage()).getMessage()
    assert "[voc_bad_bndbox]" in conv
    assert _counts(tmp_path, "voc", "train") == {"voc_missing_xml": 1, "voc_bad_xml": 1, "voc_size_from_image": 1,
                                                 "voc_box_clipped": 1, "voc_bad_bndbox": 2, "voc_empty_box": 1}
    gt = ds.coco.dataset
    assert ds.class_names == ["background", "dog", "wolf"]  # not all of VOC's 20: the names found, sorted
    files = {img["id"]: img["file_name"] for img in gt["images"]}
    anns = {(files[a["image_id"]], a["category_id"]): a for a in gt["annotations"]}
    assert anns[("a.jpg", 1)]["bbox"] == [0, 0, 10, 20]        # 1-based inclusive -> continuous
    assert anns[("a.jpg", 2)]["iscrowd"] == 1                  # difficult: ignored by COCOeval
    assert anns[("nosize.jpg", 1)]["bbox"] == [0, 0, 40, 20]   # clipped to the image's own 40x20
    _, target = ds[sorted(files.values()).index("a.jpg")]
    assert target["labels"].tolist() == [1]                    # the difficult wolf is no training target


def test_voc_with_only_voc_class_names_uses_vocs_twenty_classes_in_order(tmp_path: Path) -> None:
    root = tmp_path / "VOC"
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "x.xml").write_text(_voc_xml(_obj("person", (1, 1, 10, 10))))
    _jpg(root / "JPEGImages" / "x.jpg")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("x\n")
    ds = build_dataset(_cfg("data.format=voc", f"data.root={root}"), DETECTION, "val")
    assert len(ds.class_names) == 21 and ds.class_names[15] == "person"  # [0] is the background
    assert ds.coco.dataset["annotations"][0]["category_id"] == 15


def test_voc_without_a_split_list_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "VOC" / "Annotations").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/train\.txt does not exist.*Pascal VOC layout"):
        build_dataset(_cfg("data.format=voc", f"data.root={tmp_path / 'VOC'}"), DETECTION, "train")


# ------------------------------------------------------------------------------------------ the commands
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_make_shapes_in_a_layout_then_train_on_it(fmt: str, tmp_path: Path) -> None:
    from resnet_det.cli import main

    data = tmp_path / fmt
    assert main(["make-shapes", str(data), "--format", fmt, "--num-train", "6", "--num-val", "3",
                 "--image-size", "64"]) == 0
    out = tmp_path / "run"
    assert main(["train", "shapes/faster_rcnn_R_50_FPN", f"data.format={fmt}", f"data.root={data}",
                 "model.backbone.name=resnet18", "model.backbone.width=8", "model.fpn.channels=16",
                 "model.roi.fc_dim=32", "model.input.min_size=[64]", "model.input.max_size=64",
                 "model.input.test_min_size=64", "model.input.test_max_size=64", "data.num_workers=0",
                 "solver.ims_per_batch=2", "solver.max_iter=2", "solver.steps=[100]", "solver.warmup_iters=1",
                 "train.checkpoint_period=2", "train.max_time_minutes=null", "train.device=cpu",
                 f"train.output_dir={out}", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iteration"] == 2 and "bbox/AP" in summary["eval"]


def test_convert_refuses_a_non_empty_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from resnet_det.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert main(["convert", "--from", "coco", "--root", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err

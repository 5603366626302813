"""Dataset formats (detection.data.formats): the registry, the YOLO and Pascal VOC loaders with their
validation, conversion between layouts, and the synthetic shapes written in those layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detection.config import load_config
from detection.data.formats import (
    DatasetFormat,
    SplitFiles,
    format_names,
    get_format,
    register_format,
)
from detection.data.shapes import make_shapes, shapes_paths
from detection.engine.launch import build_dataset
from detection.tasks import DETECTION
from resnet_det.config_files import resolve_config

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
def test_an_unknown_format_is_a_config_error_listing_the_known_ones() -> None:
    assert format_names()[0] == "coco"
    with pytest.raises(ValueError, match=r"data\.format.*'coco'"):
        _cfg("data.format=pascal")
    with pytest.raises(ValueError, match="not a dataset format"):
        get_format("pascal")


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


# ------------------------------------------------------------------------------------------ the commands
def test_convert_refuses_a_non_empty_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from resnet_det.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert main(["convert", "--from", "coco", "--root", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err

"""The start-up benchmark: the synthetic train2017-shaped file and the ``benchmark-startup`` command (on a small
generated file; the full-size figures are a command's output, never asserted)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from resnet_det.cli import main
from resnet_det.data import CocoDetection
from resnet_det.studies.startup import COCO_CATEGORIES, MODES, generate_coco_file


def test_the_generated_file_is_deterministic_and_shaped_like_train2017(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    info = generate_coco_file(tmp_path / "a.json", images=60, instances=450, seed=0)
    generate_coco_file(tmp_path / "b.json", images=60, instances=450, seed=0)
    generate_coco_file(tmp_path / "c.json", images=60, instances=450, seed=1)
    a = (tmp_path / "a.json").read_bytes()
    assert a == (tmp_path / "b.json").read_bytes() and a != (tmp_path / "c.json").read_bytes()
    assert info["bytes"] == len(a) and (info["images"], info["annotations"]) == (60, 450)
    data = json.loads(a)
    anns = data["annotations"]
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(i, n) for i, n, _ in COCO_CATEGORIES]
    assert len(data["categories"]) == 80 and max(c["id"] for c in data["categories"]) == 90
    assert set(data["images"][0]) == {"license", "file_name", "coco_url", "height", "width", "date_captured",
                                      "flickr_url", "id"}
    crowd = [x for x in anns if x["iscrowd"]]
    assert crowd and all(isinstance(x["segmentation"]["counts"], list) and x["id"] > 900100000000 for x in crowd)
    polys = [x for x in anns if not x["iscrowd"]]
    assert all(len(p) >= 8 and len(p) % 2 == 0 for x in polys for p in x["segmentation"])
    assert all(re.fullmatch(r"-?\d+(\.\d{1,2})?", repr(v)) for x in polys[:50] for p in x["segmentation"] for v in p)
    image_order = [x["image_id"] for x in anns]
    assert image_order != sorted(image_order)  # not grouped by image, as in COCO's own file
    coco = COCO(str(tmp_path / "a.json"))  # pycocotools reads it ...
    capsys.readouterr()
    assert len(coco.anns) == 450 and len(coco.imgs) == 60
    ds = CocoDetection(tmp_path, tmp_path / "a.json", training=False)  # ... and our validation finds nothing wrong
    assert ds.report.skipped == {} and ds.report.fixed == {} and ds.report.num_annotations == 450
    assert ds.report.num_crowd == len(crowd)


def test_the_command_measures_every_mode_and_writes_the_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench"
    code = main(["benchmark-startup", "--images", "40", "--instances", "300", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    (path,) = out.glob("startup_40x300.json")
    record = json.loads(path.read_text())
    assert record["command"][:2] == ["resnet-det", "benchmark-startup"] and "--images" in record["command"]
    assert list(record["summary"]) == list(MODES) and len(record["runs"]) == len(MODES)
    assert {"cpu", "cpus", "platform"} <= set(record["machine"]) and {"numpy", "pycocotools"} <= set(record["versions"])
    items = {r["mode"]: r["items"] for r in record["runs"]}
    assert items["pycocotools"] == 40 and items["ours"] == items["ours_write_cache"] == items["ours_cached"] > 0
    for row in record["runs"]:
        assert row["seconds"] >= 0 and row["peak_rss_bytes"] >= row["base_rss_bytes"] > 0
    assert record["summary"]["pycocotools"]["time_ratio"] == 1.0
    for label in ("pycocotools COCO()", "ours, no cache", "ours, writing the cache", "ours, from the cache"):
        assert label in printed
    assert f"wrote {path}" in printed


def test_a_missing_annotation_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["benchmark-startup", "--ann-file", str(tmp_path / "none.json"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.json" in err[0] and err[0].startswith("resnet-det benchmark-startup: error:")

"""CocoDetection validation: one small broken JSON per rule (count in the report + the log line),
fatal problems raise DatasetError with a clear message."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from resnet_det.data.coco import CocoDetection, DatasetError

LOGGER = "resnet_det.data.coco"


def base_coco() -> dict[str, Any]:
    """Two 100x80 (w x h) images, two categories, three valid annotations."""
    square = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": 80, "width": 100},
            {"id": 2, "file_name": "b.jpg", "height": 80, "width": 100},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 20.0, 20.0], "area": 400.0,
             "iscrowd": 0, "segmentation": [square]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50.0, 40.0, 10.0, 20.0], "area": 200.0,
             "iscrowd": 0, "segmentation": [[50.0, 40.0, 60.0, 40.0, 60.0, 60.0, 50.0, 60.0]]},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [10.0, 10.0, 20.0, 20.0], "area": 400.0,
             "iscrowd": 0, "segmentation": [square]},
        ],
    }


def open_ds(
    tmp_path: Path, data: Any, caplog: pytest.LogCaptureFixture, **kwargs: Any
) -> tuple[CocoDetection, str]:
    """Writes ``data``, opens it and returns the dataset and its single summary log line."""
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    kwargs.setdefault("training", False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ds = CocoDetection(tmp_path, ann, **kwargs)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1, [r.getMessage() for r in records]
    return ds, records[0].getMessage()


def assert_skipped(ds: CocoDetection, msg: str, key: str, n: int) -> None:
    assert ds.report.skipped.get(key) == n, ds.report.skipped
    assert f"{n} " in msg and f"[{key}]" in msg, msg


# ---------------------------------------------------------------------------------------------- ok
def test_clean_file_reports_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds, msg = open_ds(tmp_path, base_coco(), caplog)
    assert ds.report.skipped == {} and ds.report.fixed == {}
    assert "no problems found" in msg and "2 images, 3 annotations" in msg
    assert caplog.records[-1].levelno == logging.INFO
    assert len(ds) == 2 and len(ds.coco.anns) == 3


# -------------------------------------------------------------------------------------- image rules
def test_image_missing_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    del data["images"][1]["file_name"]
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "image_missing_keys", 1)
    assert "file_name" in msg
    assert ds.ids == [1]
    # its annotation is reported as on a skipped image, not silently lost
    assert_skipped(ds, msg, "annotation_on_skipped_image", 1)
    assert caplog.records[-1].levelno == logging.WARNING


def test_image_zero_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    data["images"][1]["id"] = 0
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "image_bad_id", 1)
    assert 0 not in ds.coco.imgs and ds.ids == [1]


def test_image_duplicate_id_keeps_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    data["images"].append({"id": 1, "file_name": "dup.jpg", "height": 80, "width": 100})
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "image_duplicate_id", 1)
    assert "dup.jpg" in msg
    assert ds.coco.imgs[1]["file_name"] == "a.jpg"  # pycocotools alone would keep the last one
    assert len(ds.coco.dataset["images"]) == 2


def test_image_bad_size(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    data["images"][1]["height"] = 0
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "image_bad_size", 1)
    assert_skipped(ds, msg, "annotation_on_skipped_image", 1)


# --------------------------------------------------------------------------------- annotation rules
def test_annotation_missing_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    del data["annotations"][0]["bbox"]
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "annotation_missing_keys", 1)
    assert "bbox" in msg and 1 not in ds.coco.anns


def test_annotation_zero_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    data["annotations"][0]["id"] = 0
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "annotation_bad_id", 1)
    assert 0 not in ds.coco.anns and len(ds.coco.anns) == 2


def test_annotation_duplicate_id_keeps_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    data["annotations"][2]["id"] = 1
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "annotation_duplicate_id", 1)
    assert ds.coco.anns[1]["image_id"] == 1 and len(ds.coco.anns) == 2


def test_annotation_unknown_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    data["annotations"][2]["image_id"] = 999
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "annotation_unknown_image", 1)
    assert "999" in msg


def test_annotation_unknown_category(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    data["annotations"][0]["category_id"] = 42
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "annotation_unknown_category", 1)
    assert "category_id 42" in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [("bbox", [1.0, 2.0, 3.0]), ("bbox", [1.0, 2.0, float("nan"), 3.0]), ("bbox", "oops"), ("iscrowd", 2)],
)
def test_annotation_invalid_field(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, value: Any
) -> None:
    data = base_coco()
    data["annotations"][0][field] = value
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "annotation_invalid_field", 1)
    assert field in msg


@pytest.mark.parametrize("bbox", [[10.0, 10.0, 0.0, 5.0], [10.0, 10.0, 5.0, -1.0]])
def test_box_degenerate(tmp_path: Path, caplog: pytest.LogCaptureFixture, bbox: list[float]) -> None:
    data = base_coco()
    data["annotations"][1]["bbox"] = bbox
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "box_degenerate", 1)
    assert 2 not in ds.coco.anns


@pytest.mark.parametrize("bbox", [[90.0, 10.0, 15.0, 5.0], [-3.0, 10.0, 10.0, 5.0], [10.0, 70.0, 5.0, 12.0]])
def test_box_outside_image(tmp_path: Path, caplog: pytest.LogCaptureFixture, bbox: list[float]) -> None:
    data = base_coco()
    data["annotations"][1]["bbox"] = bbox
    ds, msg = open_ds(tmp_path, data, caplog)
    assert_skipped(ds, msg, "box_outside_image", 1)
    assert "100x80" in msg


def test_box_slightly_outside_is_clipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    data["annotations"][1]["bbox"] = [-0.5, 70.0, 20.0, 10.8]  # exceeds by 0.5 px left, 0.8 px bottom
    ds, msg = open_ds(tmp_path, data, caplog)
    assert ds.report.skipped == {}
    assert ds.report.fixed == {"box_clipped": 1}
    assert "[box_clipped]" in msg
    # measured: 0 (the clipped box is exact in float)
    np.testing.assert_allclose(ds.coco.anns[2]["bbox"], [0.0, 70.0, 19.5, 10.0])


@pytest.mark.parametrize("bad", [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
def test_invalid_polygon_is_removed_from_its_annotation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: list[float]
) -> None:
    data = base_coco()
    good = data["annotations"][0]["segmentation"][0]
    data["annotations"][0]["segmentation"] = [good, bad]
    ds, msg = open_ds(tmp_path, data, caplog, with_masks=True)
    assert_skipped(ds, msg, "polygon_invalid", 1)
    assert ds.coco.anns[1]["segmentation"] == [good]  # the annotation survives with its valid part
    assert f"{len(bad)} coordinates" in msg


def test_annotation_without_valid_polygon_skipped_with_masks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = base_coco()
    data["annotations"][0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]
    ds, msg = open_ds(tmp_path, data, caplog, with_masks=True)
    assert_skipped(ds, msg, "polygon_invalid", 1)
    assert_skipped(ds, msg, "annotation_invalid_segmentation", 1)
    assert 1 not in ds.coco.anns


def test_annotation_without_valid_polygon_kept_as_box_without_masks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = base_coco()
    data["annotations"][0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0, 5.0]]
    ds, msg = open_ds(tmp_path, data, caplog, with_masks=False)
    assert_skipped(ds, msg, "polygon_invalid", 1)
    assert ds.report.fixed == {"segmentation_removed": 1}
    assert ds.coco.anns[1]["segmentation"] == [] and ds.coco.anns[1]["bbox"] == [10.0, 10.0, 20.0, 20.0]


def test_rle_of_wrong_size_skipped_with_masks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    rle = mask_utils.encode(np.asfortranarray(np.ones((10, 10), dtype=np.uint8)))
    data["annotations"][0]["segmentation"] = {"size": [10, 10], "counts": rle["counts"].decode()}
    ds, msg = open_ds(tmp_path, data, caplog, with_masks=True)
    assert_skipped(ds, msg, "annotation_invalid_segmentation", 1)
    assert "RLE size [10, 10]" in msg


def test_missing_area_and_iscrowd_are_filled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    del data["annotations"][0]["area"]
    del data["annotations"][1]["iscrowd"]
    ds, msg = open_ds(tmp_path, data, caplog)
    assert ds.report.fixed == {"area_filled": 1, "iscrowd_filled": 1}
    assert "[area_filled]" in msg and "[iscrowd_filled]" in msg
    # measured: 0: a whole-pixel 20 x 20 square rasterises to exactly 400 pixels
    assert ds.coco.anns[1]["area"] == pytest.approx(400.0, abs=1e-9)  # polygon area (rasterised)
    assert ds.coco.anns[2]["iscrowd"] == 0


@pytest.mark.parametrize(("training", "keep_empty", "expected"), [(True, None, [1]), (False, None, [1, 2]),
                                                                    (True, True, [1, 2]), (False, False, [1])])
def test_keep_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, training: bool, keep_empty: bool | None, expected: list[int]
) -> None:
    data = base_coco()
    data["annotations"][2]["iscrowd"] = 1  # image 2 only has a crowd annotation: empty for training
    ds, msg = open_ds(tmp_path, data, caplog, training=training, keep_empty=keep_empty)
    assert ds.ids == expected
    if expected == [1]:
        assert_skipped(ds, msg, "image_without_annotations", 1)
    else:
        assert "image_without_annotations" not in ds.report.skipped
    assert 2 in ds.coco.imgs  # the evaluator still sees the image and its crowd region


def test_many_problems_still_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = base_coco()
    data["annotations"].append(copy.deepcopy(data["annotations"][0]))  # duplicate id
    data["annotations"].append({**data["annotations"][1], "id": 50, "category_id": 99})
    data["annotations"].append({**data["annotations"][1], "id": 51, "bbox": [0.0, 0.0, 0.0, 1.0]})
    ds, msg = open_ds(tmp_path, data, caplog)  # open_ds asserts a single record
    assert set(ds.report.skipped) == {"annotation_duplicate_id", "annotation_unknown_category", "box_degenerate"}
    assert "\n" not in msg
    assert ds.report.as_dict()["skipped"] == ds.report.skipped


# -------------------------------------------------------------------------------------------- fatal
def _fatal(tmp_path: Path, text: str | None, match: str) -> None:
    ann = tmp_path / "ann.json"
    if text is not None:
        ann.write_text(text)
    with pytest.raises(DatasetError, match=match):
        CocoDetection(tmp_path, ann, training=True)


def test_fatal_missing_file(tmp_path: Path) -> None:
    _fatal(tmp_path, None, r"ann\.json.*not found")


def test_fatal_invalid_json(tmp_path: Path) -> None:
    _fatal(tmp_path, json.dumps(base_coco())[:-20], r"ann\.json.*not valid JSON.*line 1")


def test_fatal_top_level_not_object(tmp_path: Path) -> None:
    _fatal(tmp_path, "[1, 2]", r"top level is a list")


def test_fatal_no_images(tmp_path: Path) -> None:
    data = base_coco()
    data["images"] = []
    _fatal(tmp_path, json.dumps(data), r"'images' is empty")
    del data["images"]
    _fatal(tmp_path, json.dumps(data), r"'images' is missing")


def test_fatal_no_categories(tmp_path: Path) -> None:
    data = base_coco()
    data["categories"] = []
    _fatal(tmp_path, json.dumps(data), r"'categories' is empty")


def test_fatal_duplicate_category(tmp_path: Path) -> None:
    data = base_coco()
    data["categories"].append({"id": 3, "name": "again"})
    _fatal(tmp_path, json.dumps(data), r"category id 3 appears twice")


def test_fatal_no_usable_image(tmp_path: Path) -> None:
    data = base_coco()
    for im in data["images"]:
        im["id"] = 0
    _fatal(tmp_path, json.dumps(data), r"no usable image left.*image_bad_id")


def test_fatal_errors_are_value_errors() -> None:
    assert issubclass(DatasetError, ValueError)

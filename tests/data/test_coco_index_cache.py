"""The columnar COCO index and its cache: the same items with and without the cache, invalidation when the file
changes, damaged caches rebuilt with a warning, one process per machine building under a process group."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from resnet_det.data import CocoDetection, DatasetError
from resnet_det.data import index_cache as cache_module
from resnet_det.data.index_cache import cache_path, index_cache_dir

REPO = Path(__file__).resolve().parents[2]


def make(root: Path, cache: Path | None, **kwargs: Any) -> CocoDetection:
    kwargs.setdefault("training", False)
    return CocoDetection(root / "images", root / "annotations.json", cache_dir=cache, **kwargs)


def assert_same_items(a: CocoDetection, b: CocoDetection) -> None:
    assert a.ids == b.ids and a.class_names == b.class_names and a.cat_id_to_label == b.cat_id_to_label
    assert a.report.as_dict() == b.report.as_dict()
    assert a.aspect_ratios() == b.aspect_ratios()
    for i in range(len(a)):
        (ia, ta), (ib, tb) = a[i], b[i]
        assert torch.equal(ia, ib), i
        assert ta.keys() == tb.keys(), i
        for key in ta:
            same = torch.equal(ta[key], tb[key]) if isinstance(ta[key], torch.Tensor) else ta[key] == tb[key]
            assert same, (i, key)


def test_items_from_the_cache_equal_the_items_built(tiny_coco_src: Path, tmp_path: Path) -> None:
    kwargs = {"with_masks": True, "with_semantic": True}
    built = make(tiny_coco_src, None, **kwargs)
    first = make(tiny_coco_src, tmp_path, **kwargs)
    cached = make(tiny_coco_src, tmp_path, **kwargs)
    assert (built.index_source, first.index_source, cached.index_source) == ("built", "built", "cache")
    assert len(list(tmp_path.glob("*.idx"))) == 1
    assert len(built) == 16 and built.report.num_crowd == 1
    assert_same_items(built, cached)  # every item: image, boxes, labels, masks, sem_seg, ids, sizes
    assert built.coco.dataset == cached.coco.dataset
    for name, arr in built.index.arrays.items():
        np.testing.assert_array_equal(arr, cached.index.arrays[name], err_msg=name)


def test_the_cleaned_ground_truth_is_the_file_on_clean_data(tiny_coco_src: Path) -> None:
    raw = json.loads((tiny_coco_src / "annotations.json").read_text())
    ds = make(tiny_coco_src, None)
    assert ds.report.skipped == {} and ds.report.fixed == {}
    ours = {a["id"]: a for a in ds.coco.dataset["annotations"]}
    images = {im["id"]: im for im in raw["images"]}
    assert len(ours) == len(raw["annotations"])
    for a in raw["annotations"]:
        b = ours[a["id"]]
        for key in ("image_id", "category_id", "bbox", "area", "iscrowd"):
            assert b[key] == a[key], (a["id"], key)
        if a["iscrowd"]:  # uncompressed in the file, compressed in the index: the same mask
            h, w = images[a["image_id"]]["height"], images[a["image_id"]]["width"]
            rle = mask_utils.frPyObjects(a["segmentation"], h, w)
            assert b["segmentation"]["counts"] == rle["counts"].decode() and b["segmentation"]["size"] == [h, w]
        else:
            assert b["segmentation"] == a["segmentation"]
    assert {k: ds.coco.imgs[k]["file_name"] for k in ds.coco.imgs} == {k: v["file_name"] for k, v in images.items()}


def test_a_changed_file_invalidates_the_cache(tiny_coco: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert make(tiny_coco, cache).index_source == "built"
    ann = tiny_coco / "annotations.json"
    st = ann.stat()
    text = ann.read_text()
    changed = text.replace('"category_id": 72', '"category_id": 73', 1)  # same size
    assert changed != text and len(changed) == len(text)
    ann.write_text(changed)
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: the content hash still tells
    again = make(tiny_coco, cache)
    assert again.index_source == "built"
    assert 73 in again.index.category_id.tolist() and len(list(cache.glob("*.idx"))) == 1  # the stale one is gone
    assert make(tiny_coco, cache).index_source == "cache"


def _forge(path: Path, change: Any) -> None:
    """Rewrites the header with ``change(header)`` and a matching header CRC (a forged file, not bit rot)."""
    data = path.read_bytes()
    n = int.from_bytes(data[8:16], "little")
    header = json.loads(data[20 : 20 + n])
    change(header)
    text = json.dumps(header).encode()
    pad = b"\0" * (-(20 + len(text)) % 64)
    start = -(-(20 + n) // 64) * 64
    path.write_bytes(data[:8] + len(text).to_bytes(8, "little") + zlib.crc32(text).to_bytes(4, "little") + text
                     + pad + data[start:])


def _corrupt(kind: str, path: Path) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif kind == "a flipped payload byte":
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "a flipped header byte":
        data[30] ^= 0x01
        path.write_bytes(bytes(data))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not a cache":
        path.write_bytes(b"\x80\x04\x95 a pickle, never unpickled" * 10)
    elif kind == "forged: an object dtype":
        _forge(path, lambda h: h["arrays"]["bbox"].update(dtype="|O8"))
    elif kind == "forged: an array past the end":
        _forge(path, lambda h: h["arrays"]["coords"].update(offset=h["payload_bytes"]))
    elif kind == "forged: offsets that do not fit":
        _forge(path, lambda h: h["arrays"]["ann_start"].update(shape=[3], nbytes=24))


@pytest.mark.parametrize("kind", ["truncated", "a flipped payload byte", "a flipped header byte", "empty",
                                  "not a cache", "forged: an object dtype", "forged: an array past the end",
                                  "forged: offsets that do not fit"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tiny_coco_src: Path, tmp_path: Path, kind: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    reference = make(tiny_coco_src, tmp_path)
    (path,) = tmp_path.glob("*.idx")
    _corrupt(kind, path)
    with caplog.at_level(logging.WARNING, logger="resnet_det.data.index_cache"):
        ds = make(tiny_coco_src, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.name == "resnet_det.data.index_cache"]
    assert ds.index_source == "built" and len(warnings) == 1 and path.name in warnings[0], warnings
    assert "rebuilding it" in warnings[0]
    assert_same_items(reference, ds)
    assert make(tiny_coco_src, tmp_path).index_source == "cache"  # rewritten whole


def test_an_unwritable_cache_folder_warns_and_the_dataset_still_loads(tiny_coco_src: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="resnet_det.data.index_cache"):
        ds = make(tiny_coco_src, blocker / "cache")
    assert ds.index_source == "built" and len(ds) == 16
    assert any("could not write the index cache" in r.getMessage() for r in caplog.records)


def test_masks_and_boxes_only_have_their_own_entries(tiny_coco_src: Path, tmp_path: Path) -> None:
    assert make(tiny_coco_src, tmp_path).index_source == "built"
    assert make(tiny_coco_src, tmp_path, with_masks=True).index_source == "built"  # other rules: other key
    a, b = cache_path(tmp_path, tiny_coco_src / "annotations.json", need_segmentation=False), \
        cache_path(tmp_path, tiny_coco_src / "annotations.json", need_segmentation=True)
    assert a[0] != b[0] and a[0].name.split("-")[0] == b[0].name.split("-")[0]


def test_the_default_cache_folder(tiny_coco_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ann = tiny_coco_src / "annotations.json"
    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path))
    assert index_cache_dir(ann) is None  # 2.4 MB: indexed in well under a second, not cached
    monkeypatch.setattr(cache_module, "INDEX_CACHE_MIN_BYTES", 1)
    assert index_cache_dir(ann) == tmp_path / "coco_index"
    monkeypatch.setenv("RESNET_DET_INDEX_CACHE", "0")
    assert index_cache_dir(ann) is None
    assert index_cache_dir(tmp_path / "missing.json") is None


def test_build_dataset_caches_large_files(tiny_coco_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resnet_det.config import load_config
    from resnet_det.engine.launch import build_dataset
    from resnet_det.tasks.detection import DETECTION

    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path))
    monkeypatch.setattr(cache_module, "INDEX_CACHE_MIN_BYTES", 1)
    cfg = load_config(REPO / "configs" / "tiny_coco" / "overfit_R_18_FPN.yaml", [f"data.root={tiny_coco_src}"])
    sources = [build_dataset(cfg, DETECTION, split).index_source for split in ("train", "val", "train")]
    assert sources == ["built", "cache", "cache"]  # train and val read the same file here
    assert len(list((tmp_path / "coco_index").glob("*.idx"))) == 1


_WORKER = textwrap.dedent("""
    import json, os, sys
    rank, tmp, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    from resnet_det_common import cleanup, init_distributed
    init_distributed("cpu", init_method=f"file://{tmp}/rendezvous")
    from resnet_det.data import CocoDetection, DatasetError
    out = {}
    try:
        CocoDetection(root + "/images", tmp + "/broken.json", training=True, cache_dir=tmp + "/cache")
    except DatasetError as e:  # every rank raises, none waits forever at the barrier
        out["broken"] = str(e).split(":")[-1].strip()
    ds = CocoDetection(root + "/images", root + "/annotations.json", training=True, cache_dir=tmp + "/cache")
    out.update(rank=rank, source=ds.index_source, ids=ds.ids)
    cleanup()
    print(json.dumps(out))
""")


def test_under_a_process_group_one_process_builds_and_the_other_loads(tiny_coco_src: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"images": {}, "categories": [{"id": 1, "name": "a"}]}')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(tmp_path), str(tiny_coco_src)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [o["source"] for o in outs] == ["built", "cache"]
    assert outs[0]["ids"] == outs[1]["ids"] and len(outs[0]["ids"]) == 16
    assert all("'images' is a dict" in o["broken"] for o in outs), outs


def test_fatal_errors_are_raised_with_a_cache_folder_too(tmp_path: Path) -> None:
    (tmp_path / "ann.json").write_text("[]")
    with pytest.raises(DatasetError, match="top level is a list"):
        CocoDetection(tmp_path, tmp_path / "ann.json", training=True, cache_dir=tmp_path / "cache")
    assert not list(tmp_path.rglob("*.idx"))

"""Every image the run touches is skipped, not fatal, when it cannot be read, in the training and the
evaluation loaders alike, and counted in the dataset's report.

The images are the real COCO images of tests/data/tiny_coco (copied). Each kind of unreadable path:

- a symbolic link loop (ELOOP; ``Path.resolve`` raised RuntimeError and killed the evaluation);
- a file name longer than the filesystem allows (ENAMETOOLONG, from the annotation file);
- an I/O error while reading (EIO: injected into Pillow's read, no filesystem gives one on demand);
- a FIFO at the image's path (opening it would wait forever for a writer: it must never be opened);
- a character device at the image's path (``mknod``, root only: reading would never end or mean nothing);
- a folder at the image's path.

Each kind is checked on the dataset with both loaders (in-process, workers off), and all of them at once
through a real ``resnet-det train`` run (2 worker processes, training and the final evaluation).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import faults
import pytest

from resnet_det.data import CocoDetection
from resnet_det.data import images as images_module
from resnet_det.data.build import build_test_loader, build_train_loader

SRC = Path(__file__).resolve().parents[1] / "data" / "tiny_coco"


@pytest.fixture
def tiny_coco(tmp_path: Path) -> Path:
    dst = tmp_path / "tiny_coco"
    shutil.copytree(SRC, dst)
    return dst


@pytest.fixture
def never_block() -> Iterator[None]:
    """An in-process test that blocks (opening a FIFO) fails after 60 s instead of hanging the suite (the
    command-line runs have their own timeout)."""

    def fail(signum, frame):
        raise TimeoutError("blocked for 60 s: a FIFO or device was opened")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _annotations(root: Path) -> dict:
    return json.loads((root / "annotations.json").read_text())


def _first_image(root: Path) -> dict:
    ann = _annotations(root)
    return min(ann["images"], key=lambda im: im["id"])


def _symlink_loop(root: Path, image: dict, monkeypatch) -> str:
    path = root / "images" / image["file_name"]
    path.unlink()
    path.symlink_to(path.name)  # points at itself
    return "Symlink loop"


def _name_too_long(root: Path, image: dict, monkeypatch) -> str:
    ann = _annotations(root)
    for im in ann["images"]:
        if im["id"] == image["id"]:
            im["file_name"] = "x" * 300 + ".jpg"
    (root / "annotations.json").write_text(json.dumps(ann))
    return "ENAMETOOLONG"


def _io_error(root: Path, image: dict, monkeypatch) -> str:
    target = (root / "images" / image["file_name"]).stat().st_ino
    real_fdopen = os.fdopen

    class Failing:
        def __init__(self, f):
            self._f = f

        def read(self, *args):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return Failing(f) if os.fstat(fd).st_ino == target else f

    monkeypatch.setattr(images_module.os, "fdopen", fdopen)
    return "EIO"


def _fifo(root: Path, image: dict, monkeypatch) -> str:
    path = root / "images" / image["file_name"]
    path.unlink()
    os.mkfifo(path)
    return "a FIFO (named pipe), not a regular file; not opened"


def _char_device(root: Path, image: dict, monkeypatch) -> str:
    path = root / "images" / image["file_name"]
    path.unlink()
    try:
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # the device of /dev/zero
    except PermissionError:
        pytest.skip("mknod needs root (CI runs as root); the FIFO case covers the non-blocking open")
    return "a character device, not a regular file; not opened"


def _folder(root: Path, image: dict, monkeypatch) -> str:
    path = root / "images" / image["file_name"]
    path.unlink()
    path.mkdir()
    return "a folder, not a regular file"


BREAK: dict[str, Callable[[Path, dict, pytest.MonkeyPatch], str]] = {
    "symlink loop": _symlink_loop, "name too long": _name_too_long, "I/O error": _io_error, "FIFO": _fifo,
    "character device": _char_device, "folder": _folder,
}


@pytest.mark.usefixtures("never_block")
@pytest.mark.parametrize("kind", list(BREAK))
def test_the_evaluation_loader_skips_an_unreadable_image_and_the_report_counts_it(kind, tiny_coco, monkeypatch):
    image = _first_image(tiny_coco)
    cause = BREAK[kind](tiny_coco, image, monkeypatch)
    ds = CocoDetection(tiny_coco / "images", tiny_coco / "annotations.json", training=False)
    targets = [t for _, batch in build_test_loader(ds, batch_size=4, num_workers=0) for t in batch]
    seen = [t["image_id"] for t in targets]
    assert len(seen) == len(ds) and image["id"] not in seen  # its place is taken by the next image
    assert all("_unreadable" not in t for t in targets)  # the marker never reaches the evaluator
    assert ds.report.skipped["image_unreadable"] == 1
    (example,) = ds.report.examples["image_unreadable"]
    assert example.startswith(f"image id {image['id']}: ") and cause in example, example
    assert "images that could not be read" in ds.report.summary()


@pytest.mark.usefixtures("never_block")
@pytest.mark.parametrize("kind", list(BREAK))
def test_the_training_loader_skips_an_unreadable_image_and_the_report_counts_it(kind, tiny_coco, monkeypatch):
    image = _first_image(tiny_coco)
    cause = BREAK[kind](tiny_coco, image, monkeypatch)
    ds = CocoDetection(tiny_coco / "images", tiny_coco / "annotations.json", training=True)
    loader = iter(build_train_loader(ds, images_per_batch=4, num_workers=0, seed=0, aspect_grouping=False))
    ids = []
    for _ in range(2 * len(ds) // 4):  # two epochs: every item is asked for at least once
        _, targets = next(loader)
        assert all("_unreadable" not in t for t in targets)  # the marker never reaches the model
        ids += [t["image_id"] for t in targets]
    assert image["id"] not in ids
    assert ds.report.skipped["image_unreadable"] == 1  # once, although asked for twice
    (example,) = ds.report.examples["image_unreadable"]
    assert cause in example, example


@pytest.mark.slow
def test_a_training_run_with_every_kind_of_unreadable_image_trains_evaluates_and_reports_them(tiny_coco, tmp_path):
    """The real command, 2 loader workers, train = val: both loaders meet the same broken files."""
    ann = _annotations(tiny_coco)
    images = sorted(ann["images"], key=lambda im: im["id"])
    broken = {"symlink loop": images[0], "name too long": images[1], "FIFO": images[2], "folder": images[3]}
    for kind, image in broken.items():
        BREAK[kind](tiny_coco, image, None)
    argv = ["train", "tiny_coco/overfit_R_18_FPN", f"data.root={tiny_coco}", "model.backbone.width=8",
            "model.fpn.channels=16", "model.roi.fc_dim=32", "model.input.min_size=[64]", "model.input.max_size=96",
            "model.input.test_min_size=64", "model.input.test_max_size=96", "data.num_workers=2",
            "solver.ims_per_batch=4", "solver.max_iter=5", "solver.steps=[4]", "solver.warmup_iters=1",
            "train.checkpoint_period=100", "train.log_period=1", "train.max_time_minutes=null", "train.device=cpu",
            f"train.output_dir={tmp_path / 'run'}", "--no-progress"]
    code, log = faults.run_cli(argv, log=tmp_path / "train.log", timeout=240)
    assert code == 0, log[-4000:]
    assert "Traceback" not in log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # Training met at least the images of its 20 draws; the evaluation met every one of the 4.
    assert 1 <= summary["unreadable_images"]["train"] <= 4 and summary["unreadable_images"]["val"] == 4, summary
    (val_line,) = [x for x in log.splitlines() if "left out of the evaluation" in x]
    assert "4 of the 16 images" in val_line, val_line
    for image in broken.values():
        assert f"image id {image['id']}" in log
    assert "evaluating 12 of the 16 images" in log

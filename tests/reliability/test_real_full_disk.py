"""A real full disk: the tiny real run writes into a small tmpfs of its own until the kernel says ENOSPC.

Where mounting is allowed (CI runs as root: ``mount -t tmpfs -o size=...``), each test mounts its own
filesystems under its tmp folder and unmounts them in teardown; elsewhere the tests skip with mount's own
reason, and the simulated full disk of test_disk_and_corruption.py (ENOSPC injected into the checkpoint
writer) stays. Nothing is injected here: the errors are the kernel's.

Which writer meets the full disk is chosen by the free space left (a filler file takes the rest), measured
from the reference run's own files (tmpfs counts whole 4 KiB pages):

- checkpoints: the whole output folder on the tmpfs, room for ``model_0000001`` and the weights of
  ``model_0000002`` but not its trainer state;
- ``metrics.jsonl`` / ``log.txt``: the file is a symbolic link into a full tmpfs whose last page holds
  the first iterations' lines (a padding line fills the rest of the page), so the write of iteration 3
  fails;
- ``curves.png``, the evaluation files (``coco_instances_results.json``, ``pr_curve_bbox.png``) of the final
  evaluation: the file, or the ``eval/`` folder, on a tmpfs with less room than it needs.

Every case: exit code 3, one ``error:`` line that names the file and says "disk full", no traceback, the
last complete checkpoint intact and loadable; once the filler is deleted (space is back), ``--resume`` ends
bit for bit where the uninterrupted run does. ``resnet-det eval`` and ``resnet-det export`` (ONNX and
torch.export) into a full disk are exit 3 too, the export leaving no half file behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import faults
import pytest

from resnet_det.engine import Checkpointer

PAGE = 4096


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    """``make(name, size)`` mounts a tmpfs of ``size`` bytes at ``tmp_path/name``; all unmounted afterwards."""
    mounts: list[Path] = []

    def make(name: str, size: int) -> Path:
        if not sys.platform.startswith("linux") or shutil.which("mount") is None:
            pytest.skip("no mount command here (not Linux); the simulated disk-full test stays")
        folder = tmp_path / name
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={_pages(size)}", "tmpfs", str(folder)],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({(proc.stderr or proc.stdout).strip() or proc.returncode}); "
                        "the simulated disk-full test (test_disk_and_corruption.py) stays")
        mounts.append(folder)
        return folder

    yield make
    for folder in reversed(mounts):
        if subprocess.run(["umount", str(folder)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def _free(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _fill(folder: Path, leave: int) -> Path:
    """Takes all the free space of ``folder``'s filesystem but ``leave`` bytes (whole pages) with one file."""
    filler = folder / ".filler"
    size = _free(folder) - _pages(leave)
    assert size >= 0, f"the tmpfs has {_free(folder)} bytes free, less than the {leave} to leave"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        while size > 0:
            size -= f.write(chunk[: min(size, len(chunk))])
    assert abs(_free(folder) - _pages(leave)) <= PAGE, (_free(folder), leave)
    return filler


def _error_line(log: str) -> str:
    lines = [line for line in log.splitlines() if "error:" in line]
    assert len(lines) == 1, log[-4000:]
    return lines[0]


def _assert_failed_on(code: int, log: str, path: Path, what: str) -> str:
    assert code == 3, f"exit code {code}\n{log[-4000:]}"
    assert "Traceback" not in log and "--- Logging error ---" not in log, log[-4000:]
    line = _error_line(log)
    assert f"could not write {what} {path}: disk full (ENOSPC" in line, line
    return line


def _assert_checkpoint_intact(run: Path, line: str) -> str | None:
    ck = Checkpointer(run)
    latest = ck.latest()
    if latest is not None:
        weights, state = ck.load(latest)
        assert weights and state["iteration"] >= 1
        assert f"'{latest}'" in line, line
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]
    return latest


def _resume_and_compare(run: Path, filler: Path, tmp_path: Path, shapes_env, reference_run: Path) -> None:
    filler.unlink()  # space is back
    code, log = faults.run_cli(faults.train_argv(run, "--resume"), log=tmp_path / "resumed.log", env=shapes_env)
    assert code == 0, log[-4000:]
    faults.assert_same_training(run, reference_run)


@pytest.mark.slow  # a run and its resumed run each
def test_checkpoint_on_a_real_full_disk_keeps_the_last_one_and_resumes_exactly(small_fs, tmp_path, shapes_env,
                                                                                reference_run):
    sizes = {p.name: p.stat().st_size for p in reference_run.iterdir() if p.is_file()}
    ckpt1 = _pages(sizes["model_0000001.safetensors"]) + _pages(sizes["model_0000001.state.pt"])
    # config.yaml, log.txt, metrics.jsonl, last_checkpoint: a page each, and one page of slack each for growth.
    before = ckpt1 + 8 * PAGE
    weights2 = _pages(sizes["model_0000002.safetensors"])
    state2 = _pages(sizes["model_0000002.state.pt"])
    leave = before + weights2 + state2 // 2  # the weights of model_0000002 fit, its trainer state does not
    fs = small_fs("disk", 16 << 20)
    filler = _fill(fs, leave)
    run = fs / "run"
    code, log = faults.run_cli(faults.train_argv(run), log=tmp_path / "full.log", env=shapes_env)
    line = _assert_failed_on(code, log, run / "model_0000002.state.pt", "checkpoint file")
    assert "checkpoint 'model_0000002' was not saved" in line and "--resume" in line
    assert _assert_checkpoint_intact(run, line) == "model_0000001"
    assert not (run / "model_0000002.safetensors").exists()  # half a checkpoint is never left behind
    _resume_and_compare(run, filler, tmp_path, shapes_env, reference_run)


def _padding_record(room: int) -> bytes:
    """One JSON line (no ``iteration``: every reader skips it) that leaves ``room`` bytes in its last page."""
    size = PAGE - room
    head = b'{"type": "padding", "note": "'
    return head + b"x" * (size - len(head) - 3) + b'"}\n'


@pytest.mark.slow  # a run and its resumed run each
@pytest.mark.parametrize("name", ["metrics.jsonl", "log.txt"])
def test_metrics_and_log_on_a_real_full_disk_fail_in_iteration_3_and_resume_exactly(name, small_fs, tmp_path,
                                                                                   shapes_env, reference_run):
    text = (reference_run / name).read_bytes()
    if name == "metrics.jsonl":
        lines = text.splitlines(keepends=True)
        room = len(lines[0]) + len(lines[1]) + len(lines[2]) // 2  # records 1 and 2 fit, record 3 does not
        what = "metrics file"
    else:
        # The log up to iteration 3's line fits, that line does not. (The reference run also logged the
        # generation of the shapes dataset, which later runs find in the cache.)
        before = text[: text.index(b"iter 3/")].splitlines(keepends=True)
        room = sum(len(x) for x in before if b"resnet_det.data.shapes]" not in x) + 20
        what = "log file"
    fs = small_fs("disk", 64 << 10)
    target = fs / name
    target.write_bytes(_padding_record(room))
    filler = _fill(fs, 0)
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(target)
    code, log = faults.run_cli(faults.train_argv(run), log=tmp_path / "full.log", env=shapes_env)
    # The log handler opens the resolved path: its message names the file on the full disk.
    line = _assert_failed_on(code, log, target if name == "log.txt" else run / name, what)
    assert _assert_checkpoint_intact(run, line) == "model_0000002"
    _resume_and_compare(run, filler, tmp_path, shapes_env, reference_run)
    if name == "metrics.jsonl":  # the half-written record 3 was cut off before appending: every line parses
        assert all(json.loads(x) for x in target.read_text().splitlines())


# The final writers: (what the message calls it, the path under the run folder, the folder put on the tmpfs,
# the room left in bytes). The evaluation writes coco_instances_results.json (about 59 KB), pr_curve_bbox.png
# (about 29 KB), metrics.json; then the trainer draws curves.png (about 120 KB).
FINAL_WRITERS = {
    "evaluation results": ("evaluation file", "eval/coco_instances_results.json", "eval", 8 << 10),
    "evaluation plot": ("evaluation plot", "eval/pr_curve_bbox.png", "eval", None),
    "curves.png": ("plot", "curves.png", "curves.png", 16 << 10),
}


@pytest.mark.slow  # a run and its resumed run each
@pytest.mark.parametrize("writer", list(FINAL_WRITERS))
def test_final_writers_on_a_real_full_disk_fail_with_exit_3_and_resume(writer, small_fs, tmp_path, shapes_env,
                                                                        reference_run):
    what, rel, linked, room = FINAL_WRITERS[writer]
    if room is None:  # the results file fits, the plot does not
        results = (reference_run / "eval" / "coco_instances_results.json").stat().st_size
        room = _pages(results) + (reference_run / "eval" / "pr_curve_bbox.png").stat().st_size // 2
    fs = small_fs("disk", 1 << 20)
    run = tmp_path / "run"
    run.mkdir()
    if linked == "eval":
        (fs / "eval").mkdir()
        (run / "eval").symlink_to(fs / "eval")
    else:
        (run / linked).symlink_to(fs / linked)
    filler = _fill(fs, room)
    code, log = faults.run_cli(faults.train_argv(run), log=tmp_path / "full.log", env=shapes_env)
    line = _assert_failed_on(code, log, run / rel, what)
    assert _assert_checkpoint_intact(run, line) == "model_final"  # the training itself was complete
    _resume_and_compare(run, filler, tmp_path, shapes_env, reference_run)
    assert (run / rel).stat().st_size > 0  # written once space was back


def test_eval_command_into_a_real_full_disk_exits_3_naming_the_file(small_fs, tmp_path, shapes_env, reference_run):
    out = small_fs("disk", 256 << 10)
    _fill(out, 8 << 10)
    argv = ["eval", faults.CONFIG, "--checkpoint", str(reference_run / "model_final.safetensors"), *faults.TINY,
            "--output-dir", str(out), "--no-progress"]
    code, log = faults.run_cli(argv, log=tmp_path / "eval.log", env=shapes_env)
    _assert_failed_on(code, log, out / "eval" / "coco_instances_results.json", "evaluation file")


#: ``resnet-det export``'s formats: (the file it writes, what the error line calls it).
EXPORTS = {"onnx": ("model.onnx", "ONNX file"), "torch-export": ("model.pt2", "torch.export program")}


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_export_into_a_real_full_disk_exits_3_naming_the_file(fmt, small_fs, tmp_path, shapes_env, reference_run):
    name, what = EXPORTS[fmt]
    out = small_fs("disk", 256 << 10)
    _fill(out, 8 << 10)  # the tiny detector's file is far larger than 8 KiB
    argv = ["export", faults.CONFIG, "--checkpoint", str(reference_run / "model_final.safetensors"), *faults.TINY,
            "--format", fmt, "--output", str(out / name)]
    code, log = faults.run_cli(argv, log=tmp_path / "export.log", env=shapes_env)
    _assert_failed_on(code, log, out / name, what)
    assert sorted(p.name for p in out.iterdir()) == [".filler"]  # no half file, no temporary file left


def test_the_errno_the_tests_rely_on_is_enospc(small_fs):
    """The premise, checked on the tmpfs itself: writing past its size is ENOSPC."""
    fs = small_fs("disk", 64 << 10)
    _fill(fs, 0)
    with pytest.raises(OSError) as info, open(fs / "more", "wb") as f:
        f.write(b"x" * (2 * PAGE))
        f.flush()
    assert info.value.errno == errno.ENOSPC

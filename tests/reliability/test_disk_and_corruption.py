"""A full disk during a save, and damaged checkpoints on ``--resume``, on the tiny real run.

- Disk full: ``OSError(ENOSPC)`` half-way through writing a checkpoint file (injected into the one writer,
  :mod:`resnet_det_common.io`). The previous checkpoint stays intact and loadable, the command exits 3 with
  one line that says "disk full" and names the file, and ``--resume`` afterwards ends bit for bit where the
  uninterrupted run does.
- A damaged latest checkpoint (truncated weights, a flipped byte, a truncated trainer state): ``--resume``
  says so, names the file, resumes from the newest older complete checkpoint (nothing saved completely
  before is lost) and ends bit for bit where the uninterrupted run does.
- Nothing usable at all: exit 2, one line naming every file tried.
"""

from __future__ import annotations

from pathlib import Path

import faults
import pytest
import torch

from resnet_det.engine import Checkpointer


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "error:" in line]


def test_disk_full_while_saving_keeps_the_last_checkpoint_exits_3_and_resumes_exactly(tmp_path, shapes_env,
                                                                                       reference_run):
    run = tmp_path / "run"
    code, log = faults.run_cli(faults.train_argv(run), log=tmp_path / "full.log", fault="enospc:state.pt@2",
                               env=shapes_env)
    assert code == 3, log[-3000:]
    assert "Traceback" not in log
    (line,) = _error_lines(log)
    assert line.startswith("resnet-det train: error: could not write checkpoint file ")
    assert f"{run / 'model_0000002.state.pt'}: disk full (ENOSPC" in line, line
    assert "checkpoint 'model_0000002' was not saved" in line
    assert "the last complete checkpoint is still 'model_0000001'" in line and "--resume" in line
    # The previous checkpoint is intact; the half-written file left nothing behind.
    ck = Checkpointer(run)
    assert ck.latest() == "model_0000001" and ck.load("model_0000001")[1]["iteration"] == 1
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]

    code, log = faults.run_cli(faults.train_argv(run, "--resume"), log=tmp_path / "resumed.log", env=shapes_env)
    assert code == 0, log[-3000:]
    faults.assert_same_training(run, reference_run)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x40  # inside the last tensor: the file still parses, only its digest tells
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": ("model_final.safetensors", _truncate),
    "a flipped byte in the weights": ("model_final.safetensors", _flip_a_byte),
    "truncated trainer state": ("model_final.state.pt", _truncate),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_reported_and_resume_falls_back_to_the_previous_one(
        damage, tmp_path, copy_of, shapes_env, reference_run):
    run = copy_of(reference_run)
    name, spoil = DAMAGE[damage]
    spoil(run / name)
    # The finished run resumed: model_final is damaged, so iteration 4 is trained again from model_0000003.
    code, log = faults.run_cli(faults.train_argv(run, "--resume"), log=tmp_path / "resumed.log", env=shapes_env)
    assert code == 0, log[-3000:]
    (warning,) = [line for line in log.splitlines() if "cannot resume from the latest checkpoint" in line]
    assert str(run / name) in warning and "Resuming from 'model_0000003' (iteration 3)" in warning, warning
    assert "resumed from model_0000003 at iteration 3" in log
    faults.assert_same_training(run, reference_run)
    assert Checkpointer(run).load("model_final")[1]["iteration"] == 4  # the damaged files were replaced


def test_no_usable_checkpoint_is_exit_2_naming_every_file_tried(tmp_path, copy_of, shapes_env, reference_run):
    run = copy_of(reference_run)
    for weights in run.glob("model_*.safetensors"):
        _truncate(weights)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, log = faults.run_cli(faults.train_argv(run, "--resume"), log=tmp_path / "resumed.log", env=shapes_env)
    assert code == 2, log[-3000:]
    assert "Traceback" not in log
    (line,) = _error_lines(log)
    assert line.startswith("resnet-det train: error: no checkpoint in ") and "can be resumed" in line
    for name in ("model_final", "model_0000003", "model_0000002", "model_0000001"):
        assert f"{run / name}.safetensors" in line, name
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name in before}
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before if k.startswith("model_"))
    assert torch.load(run / "model_0000001.state.pt", weights_only=True)["iteration"] == 1  # nothing deleted

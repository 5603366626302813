"""SIGKILL at deterministic points inside a checkpoint write, then ``--resume``: the run continues from the
last complete checkpoint and ends bit for bit where the uninterrupted run ends.

The kill lands at the second save (iteration 2) of the tiny real run (real loader, 2 workers), at each
point a writer can be caught: half of the weights file written, half of the trainer state written,
between the two files, and while the ``last_checkpoint`` pointer is being replaced. Each test first proves
the kill really landed there (exit status -9, the partial temporary file on disk, the pointer unchanged),
then resumes and compares with the reference run (weights ``torch.equal``, optimizer state, schedule,
loader position, every RNG state, and the losses of every iteration).
"""

from __future__ import annotations

from pathlib import Path

import faults
import pytest
import torch
from safetensors.torch import load_file

# fault -> what must be on disk right after the kill
CASES = {
    "weights half written": "half_kill:safetensors@2",
    "state half written": "half_kill:state.pt@2",
    "between the two files": "kill_after_replace:safetensors@2",
    "pointer being replaced": "kill_before_replace:last_checkpoint@2",
}


def _temp_files(run: Path, name: str) -> list[Path]:
    return sorted(run.glob(f".{name}.tmp-*"))


def _assert_kill_landed(case: str, run: Path, reference: Path) -> None:
    assert (run / "last_checkpoint").read_text().strip() == "model_0000001", "the pointer still names the last save"
    full = (reference / "model_0000002.safetensors").stat().st_size
    if case == "weights half written":
        (tmp,) = _temp_files(run, "model_0000002.safetensors")
        assert 0 < tmp.stat().st_size < full, "half of the weights reached the temporary file"
        assert not (run / "model_0000002.safetensors").exists()
    elif case == "state half written":
        assert len(load_file(run / "model_0000002.safetensors")) > 50, "the weights file was complete"
        (tmp,) = _temp_files(run, "model_0000002.state.pt")
        assert 0 < tmp.stat().st_size < (reference / "model_0000002.state.pt").stat().st_size
        assert not (run / "model_0000002.state.pt").exists()
    elif case == "between the two files":
        assert (run / "model_0000002.safetensors").stat().st_size == full
        assert not (run / "model_0000002.state.pt").exists() and not _temp_files(run, "model_0000002.state.pt")
    else:
        (tmp,) = _temp_files(run, "last_checkpoint")
        assert tmp.read_text().strip() == "model_0000002", "the new pointer was written, not yet renamed"
        assert (run / "model_0000002.state.pt").is_file()
    # Whatever was interrupted, the checkpoint the pointer names is whole.
    assert torch.load(run / "model_0000001.state.pt", weights_only=True)["iteration"] == 1
    assert len(load_file(run / "model_0000001.safetensors")) > 50


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_inside_a_checkpoint_write_then_resume_is_bit_identical(case, tmp_path, shapes_env, reference_run):
    run = tmp_path / "run"
    code, log = faults.run_cli(faults.train_argv(run), log=tmp_path / "killed.log", fault=CASES[case], env=shapes_env)
    assert code == -9, f"the run was not killed by the fault (exit {code}):\n{log[-3000:]}"
    _assert_kill_landed(case, run, reference_run)

    code, log = faults.run_cli(faults.train_argv(run, "--resume"), log=tmp_path / "resumed.log", env=shapes_env)
    assert code == 0, log[-3000:]
    assert "resumed from model_0000001 at iteration 1" in log
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name], "the dead writer's temporary files are removed"
    faults.assert_same_training(run, reference_run)

"""One of two gloo processes of the tiny real run dies (SIGKILL) or hangs (SIGSTOP) in the middle of training.

The other one must not wait for it: it exits 3 within a bounded time (gloo notices a dead peer at once; a
silent one after ``train.dist_timeout_minutes``, instead of torch's 30-minute default) with one line that
says what happened and names the last complete checkpoint; ``--resume`` with both processes then ends bit
for bit where an uninterrupted two-process run ends (weights, optimizer, both ranks' loader positions and
RNG states, the losses of every iteration).

The two processes are started as ``torchrun`` would start them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT`` in their environment), each with one data loader worker.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import faults
import pytest

DDP = ["data.num_workers=1", "solver.ims_per_batch=4"]  # 2 images per process and iteration


def _start(run: Path, logs: Path, env: dict[str, str], *extra: str, fault: str | None = None) -> list[faults.Run]:
    port = faults.free_port()
    argv = faults.train_argv(run, *DDP, *extra)
    return [faults.Run(argv, log=logs / f"rank{r}.log", fault=fault if r == 1 else None,
                       env={**env, **faults.rank_env(r, 2, port)}) for r in range(2)]


def _finish(runs: list[faults.Run], timeout: float = 240) -> list[int]:
    return [run.wait(timeout) for run in runs]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory, shapes_env: dict[str, str]) -> Path:
    """The uninterrupted two-process run (4 iterations, a checkpoint every iteration)."""
    logs = tmp_path_factory.mktemp("ddp_reference")
    runs = _start(logs / "run", logs, shapes_env)
    codes = _finish(runs)
    assert codes == [0, 0], "\n".join(r.output()[-2000:] for r in runs)
    return logs / "run"


def _stopped(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return any(line.startswith("State:") and "T" in line.split()[1] for line in status.splitlines())


def _the_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


def test_a_killed_process_stops_the_other_at_once_and_resume_is_exact(tmp_path, shapes_env, ddp_reference):
    run = tmp_path / "run"
    rank0, rank1 = _start(run, tmp_path, shapes_env, fault="kill_in_step@3")
    assert rank1.wait(240) == -9, rank1.output()[-2000:]
    died = time.monotonic()
    code = rank0.wait(120)
    waited = time.monotonic() - died
    assert code == 3, rank0.output()[-3000:]
    assert waited < 30, f"the surviving process took {waited:.0f} s to notice"
    line = _the_error_line(rank0.output())
    assert line.startswith("resnet-det train: error: process 0 of 2 stopped: the process group failed"), line
    assert "another process died" in line and "The last complete checkpoint is 'model_0000002'" in line, line
    assert "--resume" in line

    runs = _start(run, tmp_path / "resume", shapes_env, "--resume")
    assert _finish(runs) == [0, 0], "\n".join(r.output()[-2000:] for r in runs)
    assert "resumed from model_0000002 at iteration 2" in runs[0].output()
    faults.assert_same_training(run, ddp_reference)


def test_a_hung_process_stops_the_other_after_the_configured_timeout(tmp_path, shapes_env):
    timeout_s = 9.0
    run = tmp_path / "run"
    rank0, rank1 = _start(run, tmp_path, shapes_env, f"train.dist_timeout_minutes={timeout_s / 60}",
                          fault="stop_in_step@3")
    try:
        deadline = time.monotonic() + 240
        while not _stopped(rank1.process.pid):
            assert rank1.exitcode is None and rank0.exitcode is None, rank0.output()[-2000:] + rank1.output()[-2000:]
            assert time.monotonic() < deadline, "rank 1 never reached its third step"
            time.sleep(0.05)
        hung = time.monotonic()
        code = rank0.wait(timeout_s + 60)
        waited = time.monotonic() - hung
    finally:
        os.kill(rank1.process.pid, signal.SIGKILL)  # a stopped process still dies of SIGKILL
        rank1.wait(60)
    assert code == 3, rank0.output()[-3000:]
    # It waited for the configured timeout (not the default 30 minutes), then gave up within a bounded time.
    assert timeout_s * 0.8 <= waited < timeout_s + 30, f"rank 0 exited {waited:.1f} s after rank 1 hung"
    line = _the_error_line(rank0.output())
    assert "process 0 of 2 stopped" in line and f"train.dist_timeout_minutes={timeout_s / 60:g}" in line, line
    assert "The last complete checkpoint is 'model_0000002'" in line, line

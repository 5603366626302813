"""Past one machine: two ``torchrun`` agents (``--nnodes 2``, static rendezvous on 127.0.0.1, gloo), one
process each, train the tiny real detector together; one agent is stopped by SIGTERM in the middle of
training, the other's process notices and exits; ``--resume`` with both agents ends bit for bit where an
uninterrupted two-agent run ends (weights, optimizer, both ranks' loader positions and RNG states, the
losses of every iteration).

Each agent is what a cluster runs on each of its hosts (the README's SLURM recipe): here both hosts are this
one, and the rendezvous is the first "host"'s address and port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest

ITERS = 6
ARGS = ["data.num_workers=1", "solver.ims_per_batch=4", f"solver.max_iter={ITERS}"]  # 2 images per process


def _agents(run: Path, logs: Path, env: dict[str, str], *extra: str) -> list[subprocess.Popen]:
    port = faults.free_port()
    argv = faults.train_argv(run, *ARGS, *extra)
    repo = Path(__file__).resolve().parents[2]
    child_env = {**os.environ, **env, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        child_env.pop(var, None)
    logs.mkdir(parents=True, exist_ok=True)
    agents = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--max_restarts", "0", "-m", "resnet_det", *argv]
        log = open(logs / f"agent{node}.log", "w")  # noqa: SIM115 - closed with the process
        agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                                       start_new_session=True))
        log.close()
    return agents


def _wait(agents: list[subprocess.Popen], timeout: float = 400) -> list[int]:
    codes = []
    deadline = time.monotonic() + timeout
    for agent in agents:
        try:
            codes.append(agent.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for a in agents:
                os.killpg(a.pid, signal.SIGKILL)
            raise
    return codes


def _logs(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("agent*.log")))


@pytest.fixture(scope="module")
def two_agent_reference(tmp_path_factory: pytest.TempPathFactory, shapes_env: dict[str, str]) -> Path:
    logs = tmp_path_factory.mktemp("two_agents")
    codes = _wait(_agents(logs / "run", logs, shapes_env))
    assert codes == [0, 0], _logs(logs)
    return logs / "run"


@pytest.mark.slow
def test_two_torchrun_agents_stopped_by_a_signal_resume_exactly(tmp_path, shapes_env, two_agent_reference):
    run = tmp_path / "run"
    agents = _agents(run, tmp_path / "killed", shapes_env)
    pointer = run / "last_checkpoint"
    deadline = time.monotonic() + 300
    while not (pointer.is_file() and pointer.read_text().strip() == "model_0000002"):
        assert all(a.poll() is None for a in agents), _logs(tmp_path / "killed")
        assert time.monotonic() < deadline, "the run never saved iteration 2"
        time.sleep(0.02)
    agents[1].send_signal(signal.SIGTERM)  # what a scheduler sends a job's step on one host (preemption, scancel)
    codes = _wait(agents, timeout=200)
    assert codes[0] != 0 and codes[1] != 0, f"both agents stop (exit {codes}):\n{_logs(tmp_path / 'killed')}"
    assert not (run / "model_final.safetensors").exists(), "stopped before the end"
    left = pointer.read_text().strip()
    assert left.startswith("model_000000") and int(left[-7:]) < ITERS

    codes = _wait(_agents(run, tmp_path / "resumed", shapes_env, "--resume"))
    assert codes == [0, 0], _logs(tmp_path / "resumed")
    assert f"resumed from {left} at iteration {int(left[-7:])}" in (tmp_path / "resumed" / "agent0.log").read_text()
    faults.assert_same_training(run, two_agent_reference, iterations=ITERS)

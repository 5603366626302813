"""Fault injection for the reliability tests: run ``resnet-det`` in a child process and break it on purpose.

Nothing here is a hook in production code. A fault is installed from the outside, in the child only:

- file faults patch the one writer, :mod:`resnet_det_common.io` (its module-level ``open`` and ``os``
  names, so only the writes of :func:`~resnet_det_common.io.atomic_write` see them): at the Nth write
  of a checkpoint file, write half of the bytes to the temporary file and SIGKILL the process (or raise
  ``OSError(ENOSPC)``), or SIGKILL just before / just after the rename that publishes a file;
- ``kill_in_step@N`` patches :meth:`resnet_det.engine.Trainer.run_step` to SIGKILL the process at the
  start of its Nth call (one rank of a distributed run dies in the middle of training).

Children are forked from a multiprocessing *forkserver* that has imported torch and the project once, so
each run costs its own work only (no interpreter start, no 5-second import), and every run, reference
or broken, starts from the same clean state (not from the pytest process, whose settings other tests
may have changed, and which must not fork after using OpenMP).

A fault is ``"<action>:<target>@<n>"``:

========================  ================================================================================
``half_kill:<t>@n``       the n-th write of a ``<t>`` file: half of its bytes reach the temporary file, SIGKILL
``enospc:<t>@n``          the same, then ``OSError(ENOSPC)`` instead of the kill (a full disk)
``kill_before_replace``   SIGKILL when the n-th ``<t>`` file is about to be renamed into place
``kill_after_replace``    SIGKILL right after the n-th ``<t>`` file was renamed into place
``kill_in_step@n``        SIGKILL at the start of the n-th training step
``stop_in_step@n``        SIGSTOP at the start of the n-th training step (a hung process; the test kills it)
========================  ================================================================================

with ``<t>`` one of ``safetensors`` (weights), ``state.pt`` (trainer state), ``last_checkpoint`` (pointer).

The tiny real run the reliability tests break (:data:`TINY`, :func:`train_argv`) and the check that a run
ended bit for bit where another did (:func:`assert_same_training`) live here too.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

TARGETS = ("safetensors", "state.pt", "last_checkpoint")
# Imported once by the forkserver: what every run would import (the data transforms, the evaluation and
# matplotlib for the plots included), so that children start at once.
PRELOAD = ["faults", "resnet_det.cli", "resnet_det.cli.train", "resnet_det.cli.eval", "resnet_det.cli.infer",
           "resnet_det.engine.launch", "resnet_det.engine.inference", "resnet_det.tasks.detection",
           "resnet_det.tasks.segmentation",
           "resnet_det.data", "resnet_det.data.build", "resnet_det.data.transforms", "resnet_det.evaluation",
           "matplotlib.backends.backend_agg", "matplotlib.figure", "matplotlib.pyplot"]


def _final_name(tmp: Path) -> str:
    """``.model_0000002.safetensors.tmp-123-abcd`` -> ``model_0000002.safetensors``."""
    name = tmp.name
    return name[1:name.index(".tmp-")] if name.startswith(".") and ".tmp-" in name else name


def _matches(name: str, target: str) -> bool:
    return name == target if target == "last_checkpoint" else name.endswith("." + target)


def parse_fault(fault: str) -> tuple[str, str, int]:
    """``"half_kill:safetensors@2"`` -> ``("half_kill", "safetensors", 2)`` (target "" for the step faults)."""
    head, _, count = fault.partition("@")
    action, _, target = head.partition(":")
    actions = ("half_kill", "enospc", "kill_before_replace", "kill_after_replace", "kill_in_step", "stop_in_step")
    in_step = action.endswith("_in_step")
    if action not in actions or not count.isdigit() or in_step == (target in TARGETS):
        raise ValueError(f"fault {fault!r} must be '<action>:<target>@<n>' (actions {actions}, targets {TARGETS}) "
                         "or 'kill_in_step@<n>' / 'stop_in_step@<n>'")
    return action, target, int(count)


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _HalfWriter:
    """A file whose next ``write`` stores half of the bytes, makes them durable, then kills or fails."""

    def __init__(self, f: Any, action: str, name: str) -> None:
        self._f = f
        self._action = action
        self._name = name

    def write(self, data: bytes) -> int:
        self._f.write(bytes(data)[: max(1, len(data) // 2)])
        self._f.flush()
        os.fsync(self._f.fileno())
        if self._action == "half_kill":
            _die()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)

    def __enter__(self) -> _HalfWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._f, attr)


def uninstall() -> None:
    """Undoes the file faults of :func:`install` (for tests that install one in the pytest process)."""
    from resnet_det_common import io as writer

    writer.__dict__.pop("open", None)
    writer.os = os  # type: ignore[attr-defined]


def install(fault: str) -> None:
    """Installs ``fault`` in this process (see the module docstring)."""
    action, target, nth = parse_fault(fault)
    seen = {"n": 0}

    def hit(name: str) -> bool:
        if not _matches(name, target):
            return False
        seen["n"] += 1
        return seen["n"] == nth

    if action in ("kill_in_step", "stop_in_step"):
        from resnet_det.engine import trainer as trainer_module

        real_step = trainer_module.Trainer.run_step

        def run_step(self: Any) -> Any:
            seen["n"] += 1
            if seen["n"] == nth:
                if action == "kill_in_step":
                    _die()
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGSTOP)
            return real_step(self)

        trainer_module.Trainer.run_step = run_step  # type: ignore[method-assign]
        return

    from resnet_det_common import io as writer

    if action in ("half_kill", "enospc"):
        import builtins

        def hooked_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - returned to the caller
            if "x" in mode and hit(_final_name(Path(file))):
                return _HalfWriter(f, action, _final_name(Path(file)))
            return f

        writer.open = hooked_open  # type: ignore[attr-defined]  # shadows the builtin for that module only
        return

    proxy = types.ModuleType("os")
    proxy.__dict__.update(vars(os))
    real_replace = vars(os)["replace"]

    def replace(src: Any, dst: Any) -> None:
        matched = hit(Path(dst).name)
        if matched and action == "kill_before_replace":
            _die()
        real_replace(src, dst)
        if matched:
            _die()

    proxy.replace = replace  # type: ignore[attr-defined]
    writer.os = proxy  # type: ignore[attr-defined]


def _child(argv: Sequence[str], fault: str | None, env: Mapping[str, str], log: str) -> None:
    # A forkserver child inherits "forkserver" as its default start method; `resnet-det` on Linux forks its
    # data loader workers (a forkserver of their own would start a fresh interpreter and outlive a SIGKILL).
    mp.set_start_method("fork", force=True)
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    if fault:
        install(fault)
    from resnet_det.cli import main

    code = main(list(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


class Run:
    """A ``resnet-det`` child process: ``exitcode`` (-9 after SIGKILL) and its output in ``log``."""

    def __init__(self, argv: Sequence[str], *, log: Path, fault: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        self.process = _context().Process(target=_child, args=(self.argv, fault, dict(env or {}), str(self.log)))
        self.process.start()

    def wait(self, timeout: float) -> int:
        """Waits at most ``timeout`` seconds; kills the child and raises ``TimeoutError`` after that."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(10)
            raise TimeoutError(f"resnet-det {' '.join(self.argv[:2])} did not finish in {timeout} s:\n{self.output()}")
        return int(self.process.exitcode)

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run_cli(argv: Sequence[str], *, log: Path, fault: str | None = None, env: Mapping[str, str] | None = None,
            timeout: float = 300) -> tuple[int, str]:
    """Runs ``resnet-det ARGV`` in a child (with ``fault`` installed there); returns (exit code, output)."""
    run = Run(argv, log=log, fault=fault, env=env)
    code = run.wait(timeout)
    return code, run.output()


def free_port() -> int:
    """A TCP port nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment torchrun gives process ``rank`` of ``world`` on one machine."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"}


def train_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Iteration -> the last ``train`` record of metrics.jsonl (a resumed run rewrites the iterations it repeats)."""
    out: dict[int, dict[str, Any]] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "train":
            out[int(rec["iteration"])] = rec
    return out


# --------------------------------------------------------------------------------------------------
# The tiny real run and its checks
# --------------------------------------------------------------------------------------------------

CONFIG = "shapes/faster_rcnn_R_50_FPN"
ITERS = 4
TINY = [
    "model.backbone.name=resnet18", "model.backbone.width=8", "model.fpn.channels=16", "model.roi.fc_dim=32",
    "model.input.min_size=[64]", "model.input.max_size=64", "model.input.test_min_size=64",
    "model.input.test_max_size=64", "data.shapes_num_train=16", "data.shapes_num_val=4", "data.shapes_image_size=64",
    "data.num_workers=2", "solver.ims_per_batch=2", f"solver.max_iter={ITERS}", "solver.steps=[3]",
    "solver.warmup_iters=1", "train.checkpoint_period=1", "train.log_period=1", "train.max_time_minutes=null",
    "train.device=cpu",
]


def train_argv(out: Path, *extra: str) -> list[str]:
    """``resnet-det train`` of the tiny run into ``out``."""
    return ["train", CONFIG, *TINY, f"train.output_dir={out}", "--no-progress", *extra]


def _assert_equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training(run: Path, reference: Path, *, iterations: int = ITERS) -> None:
    """``run`` ended bit for bit where ``reference`` did: weights, optimizer, schedule, data order, RNG.

    - ``model_final.safetensors``: every tensor ``torch.equal``;
    - ``model_final.state.pt``: iteration, optimizer state (momentum buffers), scheduler, grad scaler, every
      rank's loader position and RNG states (torch, CUDA, NumPy, Python) equal;
    - ``metrics.jsonl``: the same losses and learning rate at every iteration, so the same batches in
      the same order with the same augmentations (the last record of an iteration counts: a resumed
      run logs again the iterations it repeats).
    """
    got, want = load_file(run / "model_final.safetensors"), load_file(reference / "model_final.safetensors")
    assert set(got) == set(want) and len(got) > 50
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ[:5]}"
    state = torch.load(run / "model_final.state.pt", weights_only=True)
    ref_state = torch.load(reference / "model_final.state.pt", weights_only=True)
    assert state["iteration"] == ref_state["iteration"] == iterations
    for key in ("optimizer", "scheduler", "grad_scaler", "loader", "rng", "world_size", "max_iter"):
        _assert_equal(state[key], ref_state[key], key)
    assert state["optimizer"]["state"], "momentum buffers exist: the comparison is not vacuous"
    records, ref_records = train_records(run), train_records(reference)
    assert sorted(records) == sorted(ref_records) == list(range(1, iterations + 1))
    for it, ref in ref_records.items():
        assert records[it]["losses"] == ref["losses"] and records[it]["lr"] == ref["lr"], f"iteration {it}"
    assert len({r["lr"] for r in ref_records.values()}) >= 2, "warmup and decay: the lr check is not vacuous"

"""Checkpoints: round trip with weights_only, pruning, clear errors, and safety against SIGKILL."""

from __future__ import annotations

import errno
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fakes import FakeLoader
from tiny_detection import tiny_detector
from torch import nn

from resnet_det.config import SolverConfig
from resnet_det.engine import (
    POINTER_FILE,
    Checkpointer,
    CheckpointError,
    build_lr_scheduler,
    build_optimizer,
    make_trainer_state,
)
from resnet_det.engine.checkpoint import CheckpointWriteError


class Tied(nn.Module):
    """Tied weights and a non-contiguous buffer: both are refused by a naive safetensors save."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.register_buffer("t", torch.arange(12.0).reshape(3, 4).t())


def _state(iteration: int, **extra) -> dict:
    return {"iteration": iteration, **extra}


def test_round_trip_loads_with_weights_only(tmp_path):
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = build_lr_scheduler(opt, SolverConfig(max_iter=10, steps=(5,), warmup_iters=2))
    loader = FakeLoader()
    loader.position = 7
    np.random.seed(3)
    ck = Checkpointer(tmp_path)
    state = make_trainer_state(12, opt, sched, None, loader)
    path = ck.save("model_0000012", model, state)

    assert path == tmp_path / "model_0000012.safetensors"
    assert (tmp_path / POINTER_FILE).read_text().strip() == "model_0000012"
    assert ck.latest() == "model_0000012"
    # The trainer state is plain containers: it loads under weights_only=True.
    raw = torch.load(tmp_path / "model_0000012.state.pt", weights_only=True)
    assert raw["iteration"] == 12 and raw["loader"] == {0: {"position": 7}}
    assert isinstance(raw["rng"][0]["numpy"]["keys"], torch.Tensor)

    weights, trainer_state = ck.load("model_0000012")
    fresh = Tied()
    fresh.load_state_dict(weights, strict=True)  # every key survived, tied ones included
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert trainer_state["scheduler"]["last_epoch"] == sched.last_epoch
    # Loading by file path works too.
    assert ck.load(tmp_path / "model_0000012.safetensors")[1]["iteration"] == 12


def test_resume_restores_objects_rng_and_loader_position(tmp_path):
    cfg = SolverConfig(lr=0.1, max_iter=20, steps=(5,), warmup_iters=3)
    model = tiny_detector(seed=0)  # the real tiny Faster R-CNN; the loader (its position) stands in
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg)
    for _ in range(6):
        opt.step()
        sched.step()
    loader = FakeLoader()
    loader.position = 6
    ck = Checkpointer(tmp_path)
    ck.save("model_0000006", model, make_trainer_state(6, opt, sched, None, loader))
    expected_rand = (torch.rand(3), float(np.random.rand()), random.random())

    model2 = tiny_detector(seed=1)
    opt2 = build_optimizer(model2, cfg)
    sched2 = build_lr_scheduler(opt2, cfg)
    loader2 = FakeLoader()
    assert ck.resume(model2, opt2, sched2, None, loader2) == 6
    assert loader2.position == 6
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert sched2.last_epoch == 6
    assert all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), model.state_dict().values()))
    got = (torch.rand(3), float(np.random.rand()), random.random())
    assert torch.equal(got[0], expected_rand[0]) and got[1:] == expected_rand[1:]


def test_no_checkpoint_means_start_at_zero(tmp_path):
    model = tiny_detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = Checkpointer(tmp_path)
    assert ck.latest() is None
    assert ck.resume(model, opt, None, None, None) == 0


def test_keeps_the_newest_periodic_checkpoints_and_final(tmp_path):
    model = nn.Linear(2, 2)
    ck = Checkpointer(tmp_path, keep=2)
    for it in (1, 2, 3):
        ck.save(f"model_{it:07d}", model, _state(it))
    ck.save("model_final", model, _state(4))
    for it in (5, 6):
        ck.save(f"model_{it:07d}", model, _state(it))
    assert ck.list_checkpoints() == ["model_0000005", "model_0000006", "model_final"]
    assert not (tmp_path / "model_0000003.state.pt").exists()
    assert not (tmp_path / "model_0000001.safetensors").exists()


def test_orphan_half_checkpoints_are_cleaned_up_by_the_next_save(tmp_path):
    model = nn.Linear(2, 2)
    ck = Checkpointer(tmp_path, keep=3)
    ck.save("model_0000001", model, _state(1))
    ck.save("model_0000002", model, _state(2))
    (tmp_path / "model_0000001.state.pt").unlink()  # as if a prune was killed midway
    (tmp_path / "model_0000007.safetensors").write_bytes(b"partial")  # as if a save was killed midway
    assert ck.list_checkpoints() == ["model_0000002"]  # halves are never listed
    ck.save("model_0000003", model, _state(3))
    assert sorted(p.name for p in tmp_path.glob("model_*")) == [
        "model_0000002.safetensors", "model_0000002.state.pt", "model_0000003.safetensors", "model_0000003.state.pt",
    ]


def test_the_latest_checkpoint_is_never_pruned(tmp_path):
    model = nn.Linear(2, 2)
    ck = Checkpointer(tmp_path, keep=1)
    ck.save("model_0000009", model, _state(9))
    ck.save("model_0000003", model, _state(3))  # e.g. a run restarted from an older checkpoint
    assert ck.latest() == "model_0000003"
    assert "model_0000003" in ck.list_checkpoints()


def test_corrupt_or_missing_files_raise_errors_naming_them(tmp_path):
    model = nn.Linear(2, 2)
    ck = Checkpointer(tmp_path)
    ck.save("model_0000001", model, _state(1))
    weights = tmp_path / "model_0000001.safetensors"
    state = tmp_path / "model_0000001.state.pt"

    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model_0000001\.safetensors"):
        ck.load("model_0000001")
    weights.write_bytes(data)

    state.write_bytes(state.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"model_0000001\.state\.pt"):
        ck.load("model_0000001")
    state.unlink()
    with pytest.raises(CheckpointError, match=r"not found: .*model_0000001\.state\.pt") as err:
        ck.load("model_0000001")
    assert err.value.damaged and err.value.path == state
    with pytest.raises(CheckpointError, match=r"not found: .*model_0000042\.state\.pt"):
        ck.load("model_0000042")


def test_weights_that_do_not_match_their_recorded_digest_are_refused(tmp_path):
    model = nn.Linear(2, 2)
    ck = Checkpointer(tmp_path)
    ck.save("model_0000001", model, _state(1))
    ck.save("model_0000002", model, _state(2))
    weights = tmp_path / "model_0000002.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit pattern in the last tensor's bytes: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model_0000002\.safetensors do not match .*SHA-256") as err:
        ck.load("model_0000002")
    assert err.value.damaged
    # The weights of another save next to this state: refused the same way.
    weights.write_bytes((tmp_path / "model_0000001.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="different saves"):
        ck.load("model_0000002")


def _resume_objects():
    cfg = SolverConfig(lr=0.1, max_iter=20, steps=(5,), warmup_iters=3)
    model = tiny_detector(seed=0)
    opt = build_optimizer(model, cfg)
    return model, opt, build_lr_scheduler(opt, cfg), FakeLoader()


def _saved_run(tmp_path, iterations=(1, 2, 3)):
    """Checkpoints of the tiny detector at `iterations` (distinct weights each), the last one also as model_final."""
    model, opt, sched, loader = _resume_objects()
    ck = Checkpointer(tmp_path, keep=5)
    for it in iterations:
        with torch.no_grad():
            model.roi_heads.predictor.cls_score.weight.fill_(float(it))
        loader.position = it
        ck.save(f"model_{it:07d}", model, make_trainer_state(it, opt, sched, None, loader))
    return ck


@pytest.mark.parametrize("damage", ["truncated weights", "truncated state", "missing state", "flipped byte"])
def test_resume_falls_back_from_a_damaged_latest_checkpoint_and_says_so(tmp_path, damage, caplog):
    ck = _saved_run(tmp_path)
    weights, state = ck.paths("model_0000003")
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "truncated state":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "missing state":
        state.unlink()
    else:
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0x01
        weights.write_bytes(bytes(data))
    model, opt, sched, loader = _resume_objects()
    with caplog.at_level("WARNING", logger="resnet_det.engine.checkpoint"):
        assert ck.resume(model, opt, sched, None, loader) == 2
    assert ck.resumed_from == "model_0000002" and loader.position == 2
    assert torch.all(model.roi_heads.predictor.cls_score.weight == 2.0)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    named = state if damage in ("truncated state", "missing state") else weights
    assert str(named) in warning and "Resuming from 'model_0000002' (iteration 2)" in warning, warning


def test_resume_reads_the_folder_when_the_pointer_is_garbage(tmp_path, caplog):
    ck = _saved_run(tmp_path)
    (tmp_path / POINTER_FILE).write_bytes(b"\xff\xfe not a name")
    model, opt, sched, loader = _resume_objects()
    with caplog.at_level("WARNING", logger="resnet_det.engine.checkpoint"):
        assert ck.resume(model, opt, sched, None, loader) == 3
    assert "last_checkpoint" in caplog.text


def test_resume_refuses_pickled_objects_instead_of_falling_back(tmp_path):
    ck = _saved_run(tmp_path)
    marker = tmp_path / "payload_ran"
    torch.save({"iteration": 3, "evil": _Payload(str(marker))}, ck.paths("model_0000003")[1])
    model, opt, sched, loader = _resume_objects()
    refused = r"model_0000003\.state\.pt cannot be loaded: it holds pickled Python objects"
    with pytest.raises(CheckpointError, match=refused) as err:
        ck.resume(model, opt, sched, None, loader)
    assert not err.value.damaged and not marker.exists()


def test_resume_with_no_usable_checkpoint_names_every_file_tried(tmp_path):
    ck = _saved_run(tmp_path, iterations=(1, 2))
    for name in ("model_0000001", "model_0000002"):
        ck.paths(name)[0].write_bytes(b"")
    model, opt, sched, loader = _resume_objects()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be resumed") as err:
        ck.resume(model, opt, sched, None, loader)
    assert "model_0000001.safetensors" in str(err.value) and "model_0000002.safetensors" in str(err.value)
    # A named checkpoint is never replaced by another.
    with pytest.raises(CheckpointError, match=r"model_0000002\.safetensors"):
        ck.resume(model, opt, sched, None, loader, name="model_0000002")


class _Payload:
    """Unpickling this would create a file (the tests check it never does)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_state_that_weights_only_cannot_load_is_refused_at_save_time(tmp_path):
    model = nn.Linear(2, 2)
    ck = Checkpointer(tmp_path)
    ck.save("model_0000001", model, _state(1))
    with pytest.raises(TypeError, match=r"trainer_state\['loader'\]\['sampler'\].*weights_only"):
        ck.save("model_0000002", model, _state(2, loader={"sampler": object()}))
    assert ck.latest() == "model_0000001"
    assert ck.list_checkpoints() == ["model_0000001"]
    # NumPy values are converted rather than refused.
    ck.save("model_0000003", model, _state(3, loader={"pos": np.int64(5), "perm": np.arange(3)}))
    loaded = ck.load("model_0000003")[1]["loader"]
    assert loaded["pos"] == 5 and torch.equal(loaded["perm"], torch.arange(3))


@pytest.mark.parametrize("target", ["safetensors", "state.pt", "last_checkpoint"])
def test_a_full_disk_while_writing_keeps_the_previous_checkpoint_and_names_the_file(tmp_path, target):
    import faults

    model = nn.Linear(2, 2)
    ck = Checkpointer(tmp_path)
    ck.save("model_0000001", model, _state(1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    faults.install(f"enospc:{target}@1")  # the writer's next write of that file fails half-way with ENOSPC
    try:
        with pytest.raises(CheckpointWriteError) as err:
            ck.save("model_0000002", model, _state(2))
    finally:
        faults.uninstall()
    msg = str(err.value)
    written = "last_checkpoint" if target == "last_checkpoint" else f"model_0000002.{target}"
    assert f"could not write checkpoint file {tmp_path / written}: disk full (ENOSPC" in msg, msg
    assert "checkpoint 'model_0000002' was not saved" in msg and "'model_0000001'" in msg and "--resume" in msg
    assert "\n" not in msg
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert ck.latest() == "model_0000001"
    assert ck.load("model_0000001")[1]["iteration"] == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before  # untouched
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the partial temporary file is gone
    # No half checkpoint: either both files of model_0000002 (only the pointer failed) or neither.
    assert ck.list_checkpoints() == (["model_0000001", "model_0000002"] if target == "last_checkpoint"
                                     else ["model_0000001"])
    assert not list(tmp_path.glob("model_0000002.*")) or target == "last_checkpoint"


def test_bad_names_are_refused(tmp_path):
    ck = Checkpointer(tmp_path)
    for bad in ("../x", ".hidden", "a.tmp-1-ff", "model.safetensors", ""):
        with pytest.raises(ValueError, match="checkpoint name"):
            ck.save(bad, nn.Linear(1, 1), _state(0))


_WRITER = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch import nn
    from resnet_det.engine import Checkpointer

    model = nn.Linear(1024, 4096)  # 16 MiB of weights
    ck = Checkpointer(sys.argv[1], keep=2)
    i = 0
    while True:
        i += 1
        with torch.no_grad():
            model.weight.fill_(float(i))
            model.bias.fill_(float(i))
        print(f"begin {i}", flush=True)
        t0 = time.perf_counter()
        # A big trainer state too, so that the kill can land in either file.
        ck.save(f"model_{i:07d}", model, {"iteration": i, "big": torch.full((2_000_000,), float(i))})
        print(f"done {i} {time.perf_counter() - t0:.4f}", flush=True)
    """
)


def test_sigkill_while_saving_leaves_the_last_complete_checkpoint_loadable(tmp_path):
    """Kills at random moments (wherever they land): whatever is on disk afterwards loads and is consistent.
    The kills at each point of a write, proven to have landed there and resumed exactly, are
    tests/reliability/test_kill_during_checkpoint.py."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    rng = random.Random(1234)
    for rep in range(3):
        out = tmp_path / f"run{rep}"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            durations = []
            while len(durations) < 2:
                line = proc.stdout.readline()
                assert line, f"writer died: {proc.stderr.read()}"
                if line.startswith("done"):
                    durations.append(float(line.split()[2]))
            while not proc.stdout.readline().startswith("begin"):
                pass
            # Somewhere inside the next save (or just after it).
            time.sleep(rng.uniform(0.0, 1.3 * max(durations)))
        finally:
            proc.kill()
            proc.wait()
        ck = Checkpointer(out)  # also removes the temp files of the dead writer
        name = ck.latest()
        assert name is not None and name.startswith("model_") and ".tmp" not in name
        weights, state = ck.load(name)  # weights_only=True inside
        i = state["iteration"]
        assert name == f"model_{i:07d}"
        # Both files belong to the same save: no mix of an old and a new file.
        assert torch.all(weights["weight"] == i) and torch.all(weights["bias"] == i)
        assert torch.all(state["big"] == i)
        assert torch.load(out / f"{name}.state.pt", weights_only=True)["iteration"] == i
        assert name in ck.list_checkpoints()
        assert all(".tmp" not in n for n in ck.list_checkpoints())
        assert not [p for p in Path(out).iterdir() if p.name.startswith(".")]  # no temp file left

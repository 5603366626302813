"""Kill-and-resume with the training switches on: an EMA of the weights (``train.ema``, evaluated with
``test.use_ema``) and gradient accumulation (``solver.accumulate``).

The tiny real run of :mod:`faults` (ResNet-18 width 8 Faster R-CNN, real loader with 2 workers, a checkpoint
every iteration) is killed by SIGKILL, once inside the second checkpoint write (half of its trainer state,
where the EMA lives, on disk) and once at the start of the third step, then ``--resume``: it must end bit for
bit where the uninterrupted run with the same switches ends: weights, optimizer, schedule, loader position
(which counts the accumulated passes), RNG states, the losses of every iteration, and the EMA (its tensors
and update count in the trainer state, and ``model_final_ema.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

import faults
import pytest
import torch
from safetensors.torch import load_file

EMA = ["train.ema={decay: 0.9, warmup_iters: 2}", "test.use_ema=true"]
CASES = {
    # name: (switches, fault, the checkpoint the killed run left)
    "ema, killed inside a checkpoint write": (EMA, "half_kill:state.pt@2", "model_0000001"),
    "ema + accumulate 2, killed in a step": ([*EMA, "solver.accumulate=2"], "kill_in_step@3", "model_0000002"),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, shapes_env: dict[str, str]) -> dict[str, Path]:
    """The uninterrupted run of each case's switches."""
    runs = {}
    for name, (switches, _, _) in CASES.items():
        out = tmp_path_factory.mktemp("reference") / "run"
        code, log = faults.run_cli(faults.train_argv(out, *switches), log=out.parent / "train.log", env=shapes_env)
        assert code == 0, log[-4000:]
        runs[name] = out
    return runs


def _assert_same_ema(run: Path, reference: Path, accumulate: int) -> None:
    state = torch.load(run / "model_final.state.pt", weights_only=True)
    ref = torch.load(reference / "model_final.state.pt", weights_only=True)
    assert state["ema"]["updates"] == ref["ema"]["updates"] == faults.ITERS, "one EMA update per optimizer step"
    for key, value in ref["ema"]["weights"].items():
        assert torch.equal(state["ema"]["weights"][key], value), f"EMA {key}"
    exported, ref_exported = load_file(run / "model_final_ema.safetensors"), load_file(
        reference / "model_final_ema.safetensors")
    assert set(exported) == set(ref_exported) and all(torch.equal(exported[k], ref_exported[k]) for k in exported)
    # Not vacuous: the average is not the trained weights, and the loader ran `accumulate` passes per step.
    weights = load_file(run / "model_final.safetensors")
    assert any(not torch.equal(weights[k], exported[k]) for k in weights if weights[k].is_floating_point())
    assert state["loader"][0]["sampler"]["batches"] == faults.ITERS * accumulate


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_kill_then_resume_is_bit_identical_with_ema_and_accumulation(case, tmp_path, shapes_env, references):
    switches, fault, left = CASES[case]
    run = tmp_path / "run"
    code, log = faults.run_cli(faults.train_argv(run, *switches), log=tmp_path / "killed.log", fault=fault,
                               env=shapes_env)
    assert code == -9, f"the run was not killed by the fault (exit {code}):\n{log[-3000:]}"
    assert (run / "last_checkpoint").read_text().strip() == left

    code, log = faults.run_cli(faults.train_argv(run, *switches, "--resume"), log=tmp_path / "resumed.log",
                               env=shapes_env)
    assert code == 0, log[-3000:]
    assert f"resumed from {left} at iteration {int(left[-7:])}" in log
    assert "no EMA state" not in log, "the EMA came back from the checkpoint"
    faults.assert_same_training(run, references[case])
    _assert_same_ema(run, references[case], 2 if "solver.accumulate=2" in switches else 1)

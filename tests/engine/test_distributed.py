"""Distributed helpers: no-ops for one process; two gloo processes of the real tiny detector get the average of
the two halves' gradients, resume their own loader and RNG, stop together on one rank's NaN or time limit."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from engine_fakes import TinyDetector, ddp_batch, ddp_worker
from torch import nn

from resnet_det_common import (
    all_gather_object,
    all_reduce_dict,
    barrier,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    resolve_device,
    unwrap_model,
    wrap_ddp,
)


def test_single_process_without_torchrun_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed("cpu") == (0, 1, 0)
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
    reduced = all_reduce_dict({"b": torch.tensor(2.0), "a": torch.tensor(1.0, requires_grad=True)})
    assert list(reduced) == ["a", "b"] and float(reduced["a"]) == 1.0 and not reduced["a"].requires_grad
    assert all_gather_object({"x": 1}) == [{"x": 1}]
    barrier()
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, "cpu") is model
    assert unwrap_model(model) is model
    assert resolve_device("cpu") == torch.device("cpu")


def test_two_gloo_processes_match_one_process_with_the_whole_batch(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(2)]

    # Reference: one process, each half of the global batch of 4 with the sampling draws of its rank; DDP's
    # gradient is their mean (the losses are normalised per process, over its own sampled anchors and RoIs).
    images, targets = ddp_batch()
    halves = []
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        for r in range(2):
            torch.manual_seed(0)
            model = TinyDetector(augment=False).train()
            torch.manual_seed(100 + r)
            losses = model(images[2 * r:2 * r + 2], targets[2 * r:2 * r + 2])
            torch.stack([v.float() for v in losses.values()]).sum().backward()
            halves.append({n: p.grad for n, p in model.named_parameters()})
    finally:
        torch.set_num_threads(previous)
    expected = {n: (halves[0][n] + halves[1][n]) / 2 for n in halves[0]}
    assert all(g.abs().max() > 0 for g in expected.values())  # every parameter takes part
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["main"]) == (r, 2, r == 0)
        assert res["reduced"] == 1.5  # (1 + 2) / 2
        assert res["gathered"] == [{"r": 0}, {"r": 1}]
        assert set(res["grads"]) == set(expected)
        for name, g in expected.items():  # measured: 0.0 on both ranks (largest entry 2.6)
            torch.testing.assert_close(res["grads"][name], g, rtol=0, atol=1e-6, msg=f"rank {r}: {name}")

        # Checkpoints hold every rank's loader position and RNG state; each rank resumes its own.
        assert res["saved_loader"] == {0: {"position": 4}, 1: {"position": 4}}
        assert res["rng_differs"]
        assert (res["resume_start"], res["resume_position"], res["resume_rng_is_own"]) == (4, 4, True)

        # A NaN on rank 1 alone stops both, each with a FloatingPointError naming the iteration.
        assert res["nan_error"] is not None and "iteration 3" in res["nan_error"]

        # A time limit reached on rank 1 alone (after iteration 1) stops both at iteration 3, the first
        # logging all-reduce (log_period=3), with the same checkpoint: no process waits for the other.
        assert res["time_stop"] == (3, True) and res["time_checkpoint"] == "model_0000003"
    assert "loss_box_reg=nan" in results[1]["nan_error"]
    assert "another process" in results[0]["nan_error"]
    assert results[0]["lines"] == [1, 2, 3, 4]  # only rank 0 logs

"""SyncBN (norm: SyncBN) in a real process group.

This torch's ``nn.SyncBatchNorm`` synchronises GPU tensors only: in a gloo group on the CPU its forward raises
(checked here in two real processes, so the day torch runs it on the CPU this test says so). The engine
therefore refuses a CPU run of several processes with SyncBatchNorm layers at build time, with one message
saying it needs CUDA and what to use instead; one process runs it as plain BatchNorm. With two or more GPUs,
two NCCL processes show its forward and gradients equal plain BatchNorm over the concatenated batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from tiny_detection import tiny_detector

from resnet_det.config import config_from_dict
from resnet_det.engine import build_trainer
from resnet_det.engine.trainer import check_sync_batchnorm


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _batch() -> torch.Tensor:
    return torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1


def _worker(rank: int, world: int, port: int, device: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        dev = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
        torch.manual_seed(1)
        bn = torch.nn.SyncBatchNorm(6).to(dev).train()
        x = _batch()[rank * 2:(rank + 1) * 2].to(dev).requires_grad_(True)
        weight = torch.linspace(-1, 1, x.numel()).reshape(x.shape).to(dev)
        try:
            y = bn(x)
        except ValueError as err:
            torch.save({"error": str(err)}, f"{out}/r{rank}.pt")
            return
        (y * weight).sum().backward()
        torch.save({"y": y.detach().cpu(), "dx": x.grad.cpu(), "dw": bn.weight.grad.cpu(), "db": bn.bias.grad.cpu(),
                    "mean": bn.running_mean.cpu(), "var": bn.running_var.cpu()}, f"{out}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(device: str, tmp_path) -> list[dict]:
    mp.spawn(_worker, args=(2, _port(), device, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]


def test_this_torch_runs_sync_batchnorm_only_on_gpus(tmp_path):
    results = _run("cpu", tmp_path)
    for res in results:
        assert "error" in res, "nn.SyncBatchNorm ran on the CPU in a gloo group: replace this test by the CPU " \
                               "twin of test_sync_batchnorm_equals_batchnorm_over_the_whole_batch_on_two_gpus"
        assert "GPU" in res["error"]


def test_a_cpu_run_of_several_processes_with_sync_bn_fails_at_build_time_saying_it_needs_cuda(tmp_path):
    model = tiny_detector(backbone_norm="SyncBN", freeze_at=0)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    with pytest.raises(ValueError, match=r"SyncBN needs CUDA.*2 processes on cpu.*model\.backbone\.norm.*BN"):
        check_sync_batchnorm(model, "cpu", 2)
    check_sync_batchnorm(model, "cpu", 1)  # one process: SyncBatchNorm is BatchNorm
    check_sync_batchnorm(model, "cuda", 2)
    check_sync_batchnorm(tiny_detector(), "cpu", 2)  # FrozenBN: nothing to synchronise

    # One process on the CPU builds (SyncBatchNorm is then plain BatchNorm).
    cfg = config_from_dict({"solver": {"ims_per_batch": 2}, "train": {"device": "cpu", "output_dir": str(tmp_path)}})
    assert build_trainer(cfg, model, _NoLoader(), progress=False).world_size == 1


class _NoLoader:
    def __iter__(self):
        raise AssertionError("not iterated")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL, one process per GPU)")
def test_sync_batchnorm_equals_batchnorm_over_the_whole_batch_on_two_gpus(tmp_path):
    results = _run("cuda", tmp_path)
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm2d(6).train()
    x = _batch().requires_grad_(True)
    half = x[:2]
    weight = torch.linspace(-1, 1, half.numel()).reshape(half.shape)  # each rank's weighting of its half
    y = bn(x)
    (y * torch.cat([weight, weight])).sum().backward()
    for r, res in enumerate(results):
        sl = slice(r * 2, (r + 1) * 2)
        # assert_close's fp32 defaults (not measured here: this machine has no GPU).
        torch.testing.assert_close(res["y"], y[sl].detach())
        torch.testing.assert_close(res["dx"], x.grad[sl])
        # SyncBatchNorm all-reduces the statistics, DDP would average the parameter gradients: each rank holds
        # the gradient of its own half's loss, and the two add up to the whole batch's.
        torch.testing.assert_close(results[0]["dw"] + results[1]["dw"], bn.weight.grad)
        torch.testing.assert_close(results[0]["db"] + results[1]["db"], bn.bias.grad)
        torch.testing.assert_close(res["mean"], bn.running_mean)
        torch.testing.assert_close(res["var"], bn.running_var)

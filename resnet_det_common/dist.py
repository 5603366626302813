"""Process-group helpers: the same training script runs with one process or under ``torchrun``.

Every helper is a no-op (or the identity) when no process group is initialised, so single-process
code never needs an ``if distributed`` branch.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "ProcessGroupError",
    "all_gather_object",
    "all_reduce_dict",
    "barrier",
    "cleanup",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "is_process_group_failure",
    "resolve_device",
    "unwrap_model",
    "wrap_ddp",
]

_log = logging.getLogger(__name__)


class ProcessGroupError(RuntimeError):
    """Another process of a distributed run died or stopped answering, so this one cannot go on."""


# What gloo, NCCL and c10d say when a peer process is gone or silent (their errors are plain RuntimeErrors in
# some torch versions, DistBackendError / DistNetworkError in others).
_PEER_FAILURE_MARKERS = (
    "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out", "Timeout",
    "NCCL", "gloo", "ProcessGroup", "c10d", "Socket", "socket",
)


def is_process_group_failure(err: BaseException) -> bool:
    """True when ``err`` comes from a collective whose peers died or did not answer in time."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _PEER_FAILURE_MARKERS)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def is_distributed() -> bool:
    """True when a process group is initialised (even with a single process)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """This process's rank on its machine, from torchrun's ``LOCAL_RANK`` (0 without torchrun)."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on global rank 0: the process that writes files and shows progress."""
    return get_rank() == 0


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """Turns a config device string into a concrete device for this process.

    Args:
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
            Under torchrun, ``"auto"`` and ``"cuda"`` pick the GPU of this process's local rank.
        local_rank: Overrides ``LOCAL_RANK`` from the environment.

    Returns:
        The device.

    Raises:
        ValueError: CUDA was asked for but is not available.
    """
    local_rank = get_local_rank() if local_rank is None else local_rank
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device {device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} asks for CUDA, which is not available on this machine "
                "(train.device=cpu trains on the CPU)"
            )
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def init_distributed(
    device: str | torch.device = "auto", *, init_method: str | None = None, timeout_minutes: float = 30.0
) -> tuple[int, int, int]:
    """Joins the process group described by torchrun's environment, or does nothing.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    Without them (or with ``WORLD_SIZE=1``) this is a no-op and returns ``(0, 1, 0)``. The backend
    is NCCL when the device is a GPU and gloo on CPUs. On CUDA, the current device is set to the
    local rank's GPU first, so that NCCL and ``all_gather_object`` use the right one.

    Args:
        device: The config's device (``"auto"``, ``"cpu"``, ``"cuda"``...), to pick the backend.
        init_method: Rendezvous URL; default ``env://`` (torchrun). Tests use ``file://<tmp>``.
        timeout_minutes: How long collectives wait for a process that stopped answering before they
            fail (a process that died is noticed at once by gloo; NCCL relies on this timeout).

    Returns:
        ``(rank, world_size, local_rank)``.
    """
    if is_distributed():
        return get_rank(), get_world_size(), get_local_rank()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return 0, 1, 0
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    rank = _env_int("RANK", -1)
    if rank < 0:
        raise ValueError("WORLD_SIZE is set but RANK is not: launch with torchrun, which sets both")
    local_rank = get_local_rank()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    from datetime import timedelta

    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        # Binding the group to the device lets NCCL connect eagerly and silences barrier() warnings.
        kwargs["device_id"] = dev
    dist.init_process_group(
        backend,
        init_method=init_method or "env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=timeout_minutes),
        **kwargs,
    )
    _log.info("joined process group: rank %d of %d (local rank %d, %s)", rank, world_size, local_rank, backend)
    return rank, world_size, local_rank


def cleanup() -> None:
    """Leaves the process group (if any); call at the end of a distributed run."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Waits for every process (no-op without a process group)."""
    if not is_distributed() or get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_dict(values: Mapping[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Sums (or averages) scalar tensors over processes, in one collective call.

    Meant for logging losses: every process must pass the same keys. Values are detached and
    reduced in float32.

    Args:
        values: Name -> scalar (or same-shaped) tensor, on this process's device.
        average: Divide the sum by the world size.

    Returns:
        A new dict with the reduced values (the same keys, in sorted order).
    """
    if not values:
        return {}
    keys = sorted(values)
    if not is_distributed() or get_world_size() == 1:
        return {k: values[k].detach().float() for k in keys}
    stacked = torch.stack([values[k].detach().float().reshape(-1) for k in keys])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    if average:
        stacked /= get_world_size()
    return {k: stacked[i].reshape(values[k].shape) for i, k in enumerate(keys)}


def all_gather_object(obj: Any) -> list[Any]:
    """Gathers one picklable object from every process; ``[obj]`` without a process group."""
    if not is_distributed() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def wrap_ddp(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Wraps the model in DistributedDataParallel when more than one process runs; else returns it.

    ``find_unused_parameters=False`` (a parameter that gets no gradient must be frozen with
    ``requires_grad=False``, which is cheaper than a graph walk every step) and
    ``broadcast_buffers=False`` (frozen BN statistics never change, and BN buffers that do should
    be SyncBN's job, not a per-forward broadcast).

    Args:
        model: The model, already on ``device``.
        device: This process's device; on CUDA it becomes ``device_ids=[index]``.

    Returns:
        The wrapped model (or the model itself with a single process).
    """
    if get_world_size() == 1:
        return model
    device = torch.device(device)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("wrap_ddp: the model has no trainable parameters (all have requires_grad=False)")
    kwargs: dict[str, Any] = {"find_unused_parameters": False, **_no_buffer_sync_kwargs()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(model, device_ids=[index], output_device=index, **kwargs)
    return DistributedDataParallel(model, **kwargs)


def _no_buffer_sync_kwargs() -> dict[str, bool]:
    """DDP's switch for "no buffer broadcast at every forward", under its name in this torch."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    # Newer torch renamed broadcast_buffers (deprecated) to forward_sync_buffers; both still sync
    # once at construction, which is what we want (every rank starts from rank 0's buffers).
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}

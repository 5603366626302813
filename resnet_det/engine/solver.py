"""Optimizer and learning-rate schedule built from :class:`resnet_det.config.SolverConfig`."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..config import SolverConfig

__all__ = ["NORM_TYPES", "WarmupLR", "build_lr_scheduler", "build_optimizer", "lr_multiplier"]

# Normalisation layers whose affine parameters get `weight_decay_norm`. Modules whose class name
# ends in "Norm" or contains "BatchNorm"/"GroupNorm"/"LayerNorm" (FrozenBatchNorm2d, RMSNorm, custom
# norms) are treated as norms too, so the backbone package needs no registration.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, NORM_TYPES):
        return True
    name = type(module).__name__
    return name.endswith("Norm") or any(s in name for s in ("BatchNorm", "GroupNorm", "LayerNorm"))


def _param_groups(model: nn.Module, cfg: SolverConfig, lr: float) -> list[dict[str, Any]]:
    """Trainable parameters grouped by weight decay (norm params, biases, the rest)."""
    decay_bias = cfg.weight_decay if cfg.weight_decay_bias is None else cfg.weight_decay_bias
    groups: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        is_norm = _is_norm(module)
        for pname, param in module.named_parameters(recurse=False):
            # Shared (tied) parameters appear under several modules; optimise them once.
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if is_norm:
                wd = cfg.weight_decay_norm
            elif pname == "bias" or pname.endswith("_bias"):
                wd = decay_bias
            else:
                wd = cfg.weight_decay
            groups.setdefault(wd, []).append(param)
    if not groups:
        raise ValueError(
            "build_optimizer: the model has no trainable parameters (every parameter has "
            "requires_grad=False); check model.freeze_at"
        )
    return [{"params": params, "lr": lr, "weight_decay": wd} for wd, params in groups.items()]


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the model's trainable parameters.

    Norm layers' weights and biases get ``cfg.weight_decay_norm`` (0 by default: decaying a BN
    scale towards 0 only fights the normalisation), other biases ``cfg.weight_decay_bias`` (None =
    ``cfg.weight_decay``), everything else ``cfg.weight_decay``. Frozen parameters are left out.
    The learning rate is ``cfg.scaled_lr``: ``cfg.lr`` scaled linearly by ``ims_per_batch /
    reference_batch_size`` when ``reference_batch_size`` is set (Goyal et al., 2017).

    Args:
        model: The model (unwrapped or DDP-wrapped: the parameters are the same).
        cfg: The solver config.

    Returns:
        The optimizer.
    """
    lr = cfg.scaled_lr
    groups = _param_groups(model, cfg, lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        betas = (cfg.adamw_betas[0], cfg.adamw_betas[1])
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"solver.optimizer {cfg.optimizer!r} is not supported; use 'sgd' or 'adamw'")


def lr_multiplier(
    iteration: int,
    *,
    max_iter: int,
    scheduler: str = "multistep",
    steps: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
) -> float:
    """The factor applied to the base learning rate at a 0-based iteration.

    Linear warmup from ``warmup_factor`` at iteration 0 to 1 at ``warmup_iters`` (Goyal et al.,
    2017), times a step decay (``gamma`` per milestone passed) or a half-cosine from 1 at 0 to 0 at
    ``max_iter``.

    Args:
        iteration: 0-based iteration (the number of completed optimizer steps).
        max_iter: Total iterations.
        scheduler: ``"multistep"`` or ``"cosine"``.
        steps: Multistep milestones.
        gamma: Multistep decay factor.
        warmup_iters: Warmup length (0 = none).
        warmup_factor: Factor at iteration 0.

    Returns:
        The multiplier.
    """
    if scheduler == "multistep":
        decay = gamma ** bisect.bisect_right(list(steps), iteration)
    elif scheduler == "cosine":
        progress = min(iteration, max_iter) / max_iter
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"solver.scheduler {scheduler!r} is not supported; use 'multistep' or 'cosine'")
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        decay *= warmup_factor * (1.0 - alpha) + alpha
    return decay


class WarmupLR(LambdaLR):
    """Warmup + multistep/cosine schedule, stepped once per iteration.

    A :class:`~torch.optim.lr_scheduler.LambdaLR` whose lambda is a plain function of the
    iteration, so its state dict holds only the progress (``last_epoch``, ``base_lrs``): a resumed
    run continues at exactly the learning rate it stopped at, and the schedule itself always comes
    from the config.

    Args:
        optimizer: The optimizer.
        max_iter: Total iterations.
        scheduler: ``"multistep"`` or ``"cosine"``.
        steps: Multistep milestones.
        gamma: Multistep decay factor.
        warmup_iters: Warmup length.
        warmup_factor: Warmup start factor.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_iter: int,
        scheduler: str = "multistep",
        steps: Sequence[int] = (),
        gamma: float = 0.1,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
    ) -> None:
        if max_iter <= 0:
            raise ValueError(f"WarmupLR max_iter must be > 0, got {max_iter}")
        kwargs = dict(
            max_iter=max_iter, scheduler=scheduler, steps=tuple(steps), gamma=gamma,
            warmup_iters=warmup_iters, warmup_factor=warmup_factor,
        )
        lr_multiplier(0, **kwargs)  # validates the scheduler name now, not at the first step

        def schedule(iteration: int) -> float:
            return lr_multiplier(iteration, **kwargs)

        self.schedule_kwargs = kwargs
        super().__init__(optimizer, schedule)

    def state_dict(self) -> dict[str, Any]:
        """Progress only; ``schedule_kwargs`` is rebuilt from the config."""
        state = super().state_dict()
        state.pop("schedule_kwargs", None)
        return state


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: SolverConfig) -> WarmupLR:
    """The warmup + multistep/cosine schedule of ``cfg`` (step it once per iteration)."""
    return WarmupLR(
        optimizer,
        max_iter=cfg.max_iter,
        scheduler=cfg.scheduler,
        steps=cfg.steps,
        gamma=cfg.gamma,
        warmup_iters=cfg.warmup_iters,
        warmup_factor=cfg.warmup_factor,
    )

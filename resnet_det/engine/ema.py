"""An exponential moving average (EMA) of a model's weights, updated after every optimizer step.

The behaviour of timm's ``ModelEmaV3``: floating-point parameters move towards the model's with
``ema = decay_t * ema + (1 - decay_t) * param`` (one ``torch._foreach_lerp_`` over all of them), buffers
(BatchNorm statistics, frozen-BN constants, counters) are copied, and the first update copies the
weights outright. ``decay_t`` is a Python float computed from the number of updates, so an update
launches device kernels only: no host-device synchronisation.

Decay warm-up: ``decay_t = decay * (1 - exp(-(t - 1) / warmup_iters))`` at the ``t``-th update (1-based;
``warmup_iters=0``: ``decay`` from the second update on). Early weights, far from the final ones, are
forgotten fast; after a few ``warmup_iters`` the average runs at ``decay``.

The average lives in tensors of its own (no second module), so it works the same with DDP and with a
``torch.compile``'d backbone: :meth:`ModelEma.swapped_into` puts it into the model for an evaluation and
restores the trained weights bit for bit afterwards. Its state (``updates`` and the tensors) is stored
in the checkpoint's trainer state (plain containers), so ``--resume`` continues the average exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from resnet_det_common import unwrap_model

__all__ = ["ModelEma"]


class ModelEma:
    """EMA of the weights of ``model`` (its unwrapped module; DDP and compile wrappers are seen through).

    Args:
        model: The trained model; the average starts as a copy of its current state.
        decay: The decay once warmed up, in [0, 1).
        warmup_iters: Updates over which the decay warms up (0: none).

    Attributes:
        updates: Optimizer steps averaged so far.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9998, warmup_iters: int = 0) -> None:
        if not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0.0 <= decay < 1.0):
            raise ValueError(f"EMA decay must be a number in [0, 1), e.g. 0.9998; got {decay!r}")
        if not isinstance(warmup_iters, int) or isinstance(warmup_iters, bool) or warmup_iters < 0:
            raise ValueError(f"EMA warmup_iters must be an int >= 0, got {warmup_iters!r}")
        self.decay = float(decay)
        self.warmup_iters = warmup_iters
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Starts the average again from ``model``'s current weights (no update counted yet)."""
        self.updates = 0
        live = self._live(model)
        # The average, key by key: floating-point parameters are averaged, everything else copied.
        self.names = list(live)
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in live.items()}
        params = {id(p) for p in unwrap_model(model).parameters()}
        self._averaged = [k for k, v in live.items() if id(v) in params and v.is_floating_point()]
        self._copied = [k for k in self.names if k not in set(self._averaged)]

    @staticmethod
    def _live(model: nn.Module) -> dict[str, Tensor]:
        """The model's own parameter and buffer tensors by state-dict key (no copies)."""
        return dict(unwrap_model(model).state_dict(keep_vars=True))

    def decay_at(self, update: int) -> float:
        """The decay applied at the ``update``-th update (1-based); 0 at the first (a copy)."""
        t = update - 1
        if t <= 0:
            return 0.0
        if self.warmup_iters == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-t / self.warmup_iters))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards ``model``'s weights (call after each optimizer step)."""
        live = self._live(model)
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        if self._averaged:
            torch._foreach_lerp_([self.shadow[k] for k in self._averaged],
                                 [live[k].detach() for k in self._averaged], weight)
        for k in self._copied:
            self.shadow[k].copy_(live[k].detach())

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model holding the average for the duration (e.g. an evaluation); its weights come back after.

        Yields:
            The unwrapped model, with the EMA weights.
        """
        module = unwrap_model(model)
        live = self._live(module)
        with torch.no_grad():
            saved = {k: live[k].detach().clone() for k in self.names}
            try:
                for k in self.names:
                    live[k].detach().copy_(self.shadow[k])
                yield module
            finally:
                for k in self.names:
                    live[k].detach().copy_(saved[k])

    def weights(self) -> dict[str, Tensor]:
        """The averaged state dict (CPU copies), e.g. for a ``.safetensors`` file."""
        return {k: self.shadow[k].detach().to("cpu", copy=True) for k in self.names}

    def state_dict(self) -> dict[str, Any]:
        """Plain containers (``torch.load(weights_only=True)`` reads them): updates, decay and the tensors."""
        return {"updates": self.updates, "decay": self.decay, "warmup_iters": self.warmup_iters,
                "weights": self.weights()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; the tensors must match the model's keys and shapes.

        Raises:
            ValueError: The saved average has other keys or shapes (another model config).
        """
        weights = state.get("weights")
        if not isinstance(weights, Mapping) or set(weights) != set(self.names):
            got = sorted(weights) if isinstance(weights, Mapping) else type(weights).__name__
            missing = sorted(set(self.names) - set(got)) if isinstance(got, list) else []
            raise ValueError(f"the checkpoint's EMA weights do not fit this model (missing {missing[:3]}...); "
                             "was it saved with another model config?")
        with torch.no_grad():
            for k in self.names:
                src = weights[k]
                if tuple(src.shape) != tuple(self.shadow[k].shape):
                    raise ValueError(f"the checkpoint's EMA weight {k!r} has shape {tuple(src.shape)}, the model "
                                     f"{tuple(self.shadow[k].shape)}")
                self.shadow[k].copy_(src)
        self.updates = int(state.get("updates", 0))

"""What the hooks of a training loop see: :class:`TrainingState`, and the step's loss records (:class:`LossRecorder`).

A :class:`~.trainer.TrainerBase` owns one ``TrainingState`` (``trainer.state``). The loop keeps its position
there (``iter``, ``in_step``, ``exception``), the trainer puts the parts it trains with (``model``,
``optimizer``, ``scaler``, ...) and what its step measured (``last_lr``, ``grad_norm``, the loss sums in
``recorder``), and the hooks read those and write what they decided (``stop_reason``, ``last_losses``,
``eval_results``, ...). A hook reads nothing else of its trainer; what it may call is
:class:`~.trainer.TrainerBase`'s (``request_stop``, ``save_checkpoint``). So a hook works with any loop that
fills the fields it reads, and a trainer's internals can change without touching a hook.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .logger import MetricsLogger

if TYPE_CHECKING:
    from .checkpoint import Checkpointer
    from .ema import ModelEma

__all__ = ["LossRecorder", "TrainingState"]


class LossRecorder:
    """The step's on-device bookkeeping: loss sums of the logging period and the first non-finite step.

    ``record`` uses device ops only (no synchronisation); the readers (``period_sums``,
    ``first_nonfinite``, ``nonfinite_seen``) are for the hooks, once per period or on the way out.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._iter: Tensor | None = None  # the iteration being recorded, on the device
        self._bad_seen: Tensor | None = None
        self._bad: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}
        self.reset_period()

    def reset_period(self) -> None:
        # Loss sums per key signature: {keys: [sum vector, steps]}. A model that returns the same
        # keys every step (the usual case) has one entry.
        self._sums: dict[tuple[str, ...], list[Any]] = {}
        self.period_iters = 0
        self.period_images = 0
        self.period_data_time = 0.0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Starts timing the period anew (after an evaluation, whose time is not training time)."""
        self.period_start = time.perf_counter()

    def record(self, keys: tuple[str, ...], values: Tensor, *, iteration: int) -> None:
        """Adds the detached loss ``values`` of 1-based ``iteration``; remembers the first non-finite one."""
        if self._iter is None:
            self._iter = torch.tensor(iteration - 1, dtype=torch.int64, device=self.device)
            self._bad_seen = torch.zeros((), dtype=torch.bool, device=self.device)
        assert self._bad_seen is not None
        self._iter += 1
        entry = self._sums.get(keys)
        if entry is None:
            self._sums[keys] = [values.clone(), 1]
        else:
            entry[0] += values
            entry[1] += 1
        bad = ~torch.isfinite(values.sum())
        newly = bad & ~self._bad_seen
        prev_iter, prev_vals = self._bad.get(keys, (torch.zeros_like(self._iter), torch.zeros_like(values)))
        self._bad[keys] = (torch.where(newly, self._iter, prev_iter), torch.where(newly, values, prev_vals))
        self._bad_seen |= bad
        self.period_iters += 1

    def period_sums(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        """Per loss name: the device sum over the period and the number of steps that had it."""
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for keys, (vec, steps) in self._sums.items():
            for i, k in enumerate(keys):
                sums[k] = sums[k] + vec[i] if k in sums else vec[i]
                counts[k] = counts.get(k, 0) + steps
        return sums, counts

    def nonfinite_flag(self) -> Tensor | None:
        """``[1]`` float32 on the device: 1 if a non-finite loss was recorded; None before any step."""
        return None if self._bad_seen is None else self._bad_seen.to(torch.float32).reshape(1)

    def nonfinite_seen(self) -> bool:
        """Whether a non-finite loss was recorded here (synchronises); False if the device cannot say."""
        if self._bad_seen is None:
            return False
        try:
            return bool(self._bad_seen)
        except Exception:  # e.g. a CUDA error made the device unusable: keep the original error
            return False

    def first_nonfinite(self) -> tuple[int, dict[str, float]] | None:
        """(1-based iteration, loss values) of the first non-finite step recorded here, or None."""
        if not self.nonfinite_seen():
            return None
        for keys, (it, vals) in self._bad.items():
            if int(it) > 0:
                return int(it), dict(zip(keys, vals.tolist()))
        return None


def _no_metrics_logger() -> MetricsLogger:
    return MetricsLogger(".", max_iter=0, enabled=False)  # writes nothing, creates nothing


@dataclasses.dataclass(eq=False)
class TrainingState:
    """The training state the hooks read and write (``trainer.state``).

    Who writes what: the loop (:class:`~.trainer.TrainerBase`) the position; the trainer the parts and the
    step's records; the hooks their decisions and outputs. Fields a loop has no use for keep their defaults
    (a loop without a checkpointer leaves ``checkpointer`` None, and a hook that needs one says so).

    Attributes:
        iter: Completed iterations (during a step, iteration ``iter + 1`` runs).
        start_iter: Where this ``train()`` call started (after a resume: the resumed iteration).
        max_iter: Iteration to train up to.
        in_step: True from the start of a step until its iteration is counted.
        stop_reason: Why the loop stops before ``max_iter``, or None; set it through
            :meth:`~.trainer.TrainerBase.request_stop` (several processes must agree on when).
        stop_vote: A stop requested on this process and not yet agreed by all (several processes).
        exception: The error the loop or a hook raised, or None (what ``after_train`` hooks look at).
        world_size: Processes training together.
        device: This process's device.
        output_dir: The run's folder (checkpoints, logs), or None.
        model: The trained model, possibly wrapped (DDP).
        optimizer / scaler: The optimizer and the gradient scaler (None: none).
        ema: The weights' EMA (:class:`~.ema.ModelEma`), or None.
        checkpointer: The run's :class:`~.checkpoint.Checkpointer`, or None.
        metrics_logger: Where the metrics go (``metrics.jsonl``, ``log.txt``); by default one that writes nothing.
        recorder: The step's loss sums and non-finite tracking, on the device (:class:`LossRecorder`).
        train_start: ``time.perf_counter()`` when this ``train()`` call started.
        last_lr: Learning rate of the last step (first parameter group).
        grad_norm: Global gradient norm of the last step (a device tensor), when clipping computes it.
        updating: True inside the optimizer update (a Ctrl-C there leaves half-updated weights).
        last_losses: The losses last logged (averaged over the period and the processes).
        last_logged_iter: The iteration they were logged at (-1: none yet).
        last_saved_iter: The iteration of the last checkpoint saved or resumed from (-1: none).
        eval_results: The last evaluation's metrics.
    """

    iter: int = 0
    start_iter: int = 0
    max_iter: int = 0
    in_step: bool = False
    stop_reason: str | None = None
    stop_vote: str | None = None
    exception: BaseException | None = None
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    output_dir: Path | None = None
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    ema: ModelEma | None = None
    checkpointer: Checkpointer | None = None
    metrics_logger: MetricsLogger = dataclasses.field(default_factory=_no_metrics_logger)
    recorder: LossRecorder = dataclasses.field(default_factory=lambda: LossRecorder(torch.device("cpu")))
    train_start: float = dataclasses.field(default_factory=time.perf_counter)
    last_lr: float = 0.0
    grad_norm: Tensor | None = None
    updating: bool = False
    last_losses: dict[str, float] = dataclasses.field(default_factory=dict)
    last_logged_iter: int = -1
    last_saved_iter: int = -1
    eval_results: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def finishing(self) -> bool:
        """True after the loop's last iteration: the hooks' final work is then done in ``after_train``."""
        return self.iter >= self.max_iter or self.stop_reason is not None

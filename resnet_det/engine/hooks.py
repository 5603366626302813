"""The trainer's hooks: everything periodic or exceptional around the training step.

A hook has four methods, called by :class:`~resnet_det.engine.trainer.TrainerBase` (each a no-op by
default): ``before_train``; per iteration ``before_step`` and ``after_step`` (``trainer.iter`` then
counts the completed iterations); ``after_train`` (always, also after an error: ``trainer.exception``
says which, and every hook's ``after_train`` runs even when an earlier one raised).

The :class:`~resnet_det.engine.Trainer`'s hooks, in the order they run (why the order matters):

1. :class:`InterruptHook` -- Ctrl-C during a step is deferred to the step's end; its ``after_step``
   raises ``KeyboardInterrupt`` *before* any hook of that iteration starts a collective (another
   process may not reach it) or writes; its ``after_train`` saves the exact resume point.
2. :class:`TimeLimit` -- asks to stop once the time is up (no synchronisation: a clock read).
3. :class:`MetricsWriter` -- every ``log_period``: the one all-reduce of the period, which carries
   the loss sums, the non-finite flag and the stop votes, so that every process learns at the same
   iteration that one of them saw a NaN (it raises before writing) or ran out of time.
   (:func:`~resnet_det.engine.build_trainer` adds :class:`LossGrowthWarning` last, which reads what it
   logged: a finite loss grown 100x over the first logged one is reported once with its iteration.)
4. :class:`NonFiniteGuard` -- the collective non-finite check before the hooks below write
   (checkpoint and evaluation iterations, and the end); an error right after a NaN becomes the NaN.
5. :class:`PeriodicCheckpointer` -- ``model_<iter>`` every period; ``model_final`` (or, stopped
   early, ``model_<iter>``) at the end. After the guard: no NaN reaches a checkpoint.
6. :class:`EvalHook` -- periodic and final evaluation, RNG states preserved; after the checkpoint, so
   a crash in the evaluation leaves the iteration saved.

Invariants, and the tests that prove them (tests/engine):

- Every process takes the same decisions at the same iterations (log, check, save, evaluate, stop):
  with several processes, decisions depend on the iteration number and on values all-reduced by
  :class:`MetricsWriter` only, never on a local clock or a local NaN (test_distributed.py: a NaN,
  or a time limit, on one of two ranks stops both at the same iteration;
  test_trainer.py::test_time_limit_stops_checkpoints_evaluates_and_says_so for one process).
- A NaN stops every process with the iteration and the loss values, and is checked before anything
  is written (test_trainer.py::test_non_finite_loss_names_iteration_and_losses_and_keeps_the_last_checkpoint,
  ::test_an_error_after_a_nan_is_reported_as_the_nan; test_distributed.py).
- Ctrl-C: the checkpoint written on the way out resumes exactly
  (test_trainer.py::test_ctrl_c_saves_at_the_current_iteration_and_resumes_exactly,
  ::test_keyboard_interrupt_inside_a_step_saves_the_last_completed_iteration).
- Evaluation does not change the random trajectory of training
  (test_trainer.py::test_evaluation_does_not_change_the_training_trajectory).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from resnet_det_common import (
    all_gather_object,
    is_main_process,
    preserve_rng_states,
    raise_log_write_failure,
    unwrap_model,
)

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = [
    "EvalHook",
    "HookBase",
    "InterruptHook",
    "LossGrowthWarning",
    "MetricsWriter",
    "NonFiniteGuard",
    "PeriodicCheckpointer",
    "TimeLimit",
    "check_finite",
    "raise_nonfinite",
]

_log = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module, int], Mapping[str, Any]]


class HookBase:
    """A hook of the training loop; subclasses override what they need.

    Attributes:
        trainer: The trainer (a weak proxy), set by ``trainer.register_hooks``.
    """

    trainer: Trainer

    def before_train(self) -> None:
        """Called once, before the first iteration."""

    def after_train(self) -> None:
        """Called once at the end, also after an error (``self.trainer.exception``)."""

    def before_step(self) -> None:
        """Called before each iteration."""

    def after_step(self) -> None:
        """Called after each iteration; ``self.trainer.iter`` counts it."""


# --------------------------------------------------------------------------------------------------
# Non-finite losses: shared by MetricsWriter (inside its all-reduce) and NonFiniteGuard
# --------------------------------------------------------------------------------------------------


def _nonfinite_message(trainer: Trainer, first_iter: int | None) -> str:
    local = trainer.recorder.first_nonfinite()
    first = first_iter if first_iter is not None else (local[0] if local else -1)
    if local is not None and local[0] == first:
        detail = "loss values: " + ", ".join(f"{k}={v}" for k, v in local[1].items())
    else:
        detail = "the non-finite loss was on another process" + (
            f" (this one saw its first at iteration {local[0]})" if local else ""
        )
    last = trainer.checkpointer.latest_or_none()
    kept = f"the last good checkpoint is '{last}' in {trainer.output_dir}" if last else "no checkpoint was saved yet"
    return (
        f"non-finite loss at iteration {first}; {detail}. Training stopped on every process; {kept}. "
        "Common causes: a learning rate too high for the batch size (lower solver.lr or lengthen "
        "solver.warmup_iters), fp16 overflow (try train.amp=bf16), or degenerate boxes in the data."
    )


def raise_nonfinite(trainer: Trainer) -> None:
    """Raises ``FloatingPointError`` naming the first bad iteration of all processes (a collective)."""
    sentinel = 2**62
    local = trainer.recorder.first_nonfinite()
    first = torch.tensor([local[0] if local else sentinel], dtype=torch.int64, device=trainer.device)
    if trainer.world_size > 1:
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    raise FloatingPointError(_nonfinite_message(trainer, int(first.item())))


def check_finite(trainer: Trainer) -> None:
    """Raises ``FloatingPointError`` on every process if any process saw a non-finite loss.

    A collective with several processes: call it at the same iterations on all of them.
    """
    flag = trainer.recorder.nonfinite_flag()
    if flag is None:  # no step recorded yet (on every process alike)
        return
    if trainer.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        raise_nonfinite(trainer)


# --------------------------------------------------------------------------------------------------
# Hooks, in the Trainer's order
# --------------------------------------------------------------------------------------------------


class InterruptHook(HookBase):
    """Ctrl-C: finish the step, then stop with a checkpoint that is an exact resume point.

    A Ctrl-C inside a step is deferred to its end (a second one goes to the previous handler:
    normally ``KeyboardInterrupt`` at once); outside a step (logging, checkpoint, evaluation) it
    interrupts at once. Either way ``after_train`` saves the state after the last completed
    iteration, unless the weights are half-updated or a loss was non-finite. Installed only in the
    main thread, and never over an ignored SIGINT.
    """

    def __init__(self) -> None:
        self.requested = False
        self._prev: Any = None
        self._installed = False

    def before_train(self) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGINT)
            if prev not in (signal.SIG_IGN, None):
                self._prev = prev
                signal.signal(signal.SIGINT, self._on_sigint)
                self._installed = True

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.trainer.in_step and not self.requested:
            # No logging here: writing to a file the interrupted code may be writing to is unsafe.
            self.requested = True
            signal.signal(signal.SIGINT, self._prev)
            return
        raise KeyboardInterrupt

    def after_step(self) -> None:
        if self.requested:
            _log.info("Ctrl-C: stopping after iteration %d", self.trainer.iter)
            raise KeyboardInterrupt

    def after_train(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._prev)
            self._installed = False
        if isinstance(self.trainer.exception, KeyboardInterrupt):
            self._save_on_interrupt()

    def _save_on_interrupt(self) -> None:
        t = self.trainer
        if not is_main_process():
            return
        if t.updating:
            _log.warning("interrupted inside the optimizer update of iteration %d: the weights are half-updated, "
                         "so no checkpoint is saved; the last one is %s", t.iter + 1, t.checkpointer.latest_or_none())
            return
        if t.recorder.nonfinite_seen():
            _log.warning("interrupted after a non-finite loss: not saving the weights; the last good checkpoint "
                         "is %s", t.checkpointer.latest_or_none())
            return
        if t.last_saved_iter == t.iter and not t.in_step:
            _log.info("interrupted at iteration %d, which is already saved (%s)", t.iter,
                      t.checkpointer.latest_or_none())
            return
        if t.in_step:
            _log.info("interrupted inside iteration %d: saving the state after iteration %d (the batch of the "
                      "unfinished iteration was consumed and is skipped on resume)", t.iter + 1, t.iter)
        # Other processes may not reach a collective now: save this rank's loader/RNG state only.
        t.save_checkpoint(f"model_{t.iter:07d}", gather=False)
        _log.info("interrupted at iteration %d; resume with train(resume=True) (tools: --resume)", t.iter)


class TimeLimit(HookBase):
    """Stops training cleanly (checkpoint, final evaluation) after ``max_time_minutes``.

    One process stops at the first iteration past the limit; several stop at the next logging
    period at which any of them is past it (the vote rides on :class:`MetricsWriter`'s all-reduce).
    """

    def __init__(self, max_time_minutes: float) -> None:
        if not max_time_minutes > 0:
            raise ValueError(f"TimeLimit max_time_minutes must be > 0, got {max_time_minutes!r}")
        self.max_time_minutes = max_time_minutes
        self._start = time.perf_counter()

    def before_train(self) -> None:
        self._start = self.trainer.train_start

    def after_step(self) -> None:
        t = self.trainer
        if t.iter < t.max_iter and time.perf_counter() - self._start > self.max_time_minutes * 60.0:
            t.request_stop(f"the time limit of {self.max_time_minutes} minutes (train.max_time_minutes) was reached")


class MetricsWriter(HookBase):
    """Logs the averaged losses every ``period`` iterations (and on the last one) with one all-reduce.

    The all-reduce carries the loss sums, the non-finite flag and the stop votes: one host-device
    synchronisation per period, and every process learns the same things at the same iteration.
    A non-finite loss raises here, before the record is written.
    """

    def __init__(self, period: int) -> None:
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ValueError(f"MetricsWriter period must be an int > 0, got {period!r}")
        self.period = period

    def after_step(self) -> None:
        t = self.trainer
        t.metrics_logger.advance()
        if t.iter % self.period == 0 or t.finishing:
            self.write()

    def after_train(self) -> None:
        t = self.trainer
        # Ctrl-C: with one process, log the partial period (several may not all reach a collective now).
        if isinstance(t.exception, KeyboardInterrupt) and t.world_size == 1 and t.recorder.period_iters > 0:
            self.write()

    def write(self) -> None:
        """Reduces, checks and logs the period's losses; applies an agreed stop."""
        t = self.trainer
        rec = t.recorder
        sums, counts = rec.period_sums()
        keys = sorted({k for ks in all_gather_object(sorted(sums)) for k in ks}) if t.world_size > 1 else sorted(sums)
        zero = torch.zeros((), device=t.device)
        flag = rec.nonfinite_flag()
        packed = torch.stack(
            [sums.get(k, zero) for k in keys]
            + [torch.tensor(float(counts.get(k, 0)), device=t.device) for k in keys]
            + [flag.reshape(()) if flag is not None else zero,
               torch.tensor(float(t.stop_vote is not None), device=t.device)]
        )
        if t.world_size > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        values = packed.tolist()  # the one host-device synchronisation of the period
        n = len(keys)
        if values[2 * n] > 0:
            raise_nonfinite(t)
        if values[2 * n + 1] > 0 and t.stop_reason is None:
            t.stop_reason = t.stop_vote or "another process asked to stop"
        losses = {k: values[i] / values[n + i] for i, k in enumerate(keys) if values[n + i] > 0}
        elapsed = time.perf_counter() - rec.period_start
        iters = max(1, rec.period_iters)
        extra: dict[str, float] = {}
        if t.grad_norm is not None:
            extra["grad_norm"] = float(t.grad_norm)
        if t.device.type == "cuda":
            extra["max_mem_mb"] = torch.cuda.max_memory_allocated(t.device) / 2**20
        if t.scaler.is_enabled():
            extra["loss_scale"] = float(t.scaler.get_scale())
        if losses:
            t.last_losses = losses
            t.last_logged_iter = t.iter
            t.metrics_logger.log_train(
                t.iter, losses, lr=t.last_lr,
                images_per_sec=rec.period_images / elapsed if elapsed > 0 else 0.0,
                time_s=time.perf_counter() - t.train_start, data_time=rec.period_data_time / iters,
                eta_seconds=(t.max_iter - t.iter) * elapsed / iters, extra=extra,
            )
        rec.reset_period()
        raise_log_write_failure()  # log.txt on a full disk stops the run here, with one line naming it


class LossGrowthWarning(HookBase):
    """Warns once, naming the iteration, when a logged total loss is ``factor`` times the first one logged.

    A finite loss that grows by orders of magnitude (a backbone with frozen BN and no pretrained weights, a
    learning rate too high) stops nothing by itself; this says so in the log. It reads the losses
    :class:`MetricsWriter` has just logged (Python floats, already on every process alike): no synchronisation
    of its own. Register it after :class:`MetricsWriter`.
    """

    def __init__(self, factor: float = 100.0) -> None:
        if not factor > 1:
            raise ValueError(f"LossGrowthWarning factor must be > 1, got {factor!r}")
        self.factor = factor
        self.first: tuple[int, float] | None = None
        self.warned = False

    def before_train(self) -> None:
        self.first, self.warned = None, False

    def after_step(self) -> None:
        t = self.trainer
        if self.warned or getattr(t, "last_logged_iter", None) != t.iter or not t.last_losses:
            return
        total = float(sum(t.last_losses.values()))
        if not math.isfinite(total):
            return  # a non-finite loss is MetricsWriter's error, not a warning
        if self.first is None:
            self.first = (t.iter, total)
            return
        first_iter, first = self.first
        if first > 0 and total > self.factor * first:
            self.warned = True
            if is_main_process():
                _log.warning(
                    "the loss is growing by orders of magnitude: total loss %.4g at iteration %d is %.3gx the %.4g "
                    "logged at iteration %d. Training is diverging; common causes: a backbone with frozen BN and no "
                    "pretrained weights (use model.backbone.norm=GN/BN/SyncBN to train from scratch, or give "
                    "model.backbone.weights), a learning rate too high (lower solver.lr, lengthen "
                    "solver.warmup_iters), or clipping off (solver.clip_grad_norm)",
                    total, t.iter, total / first, first, first_iter)


class NonFiniteGuard(HookBase):
    """The collective non-finite check before anything is written.

    Runs at the iterations where the hooks after it write (``write_periods``: the checkpoint and
    evaluation periods) and at the end, before the final checkpoint. After an error, when this
    process had seen a NaN, raises ``FloatingPointError`` from that error: a crash right after a
    NaN (NaN boxes in a later op) is reported as what it is.
    """

    def __init__(self, write_periods: Sequence[int]) -> None:
        self.write_periods = tuple(p for p in write_periods if p > 0)

    def after_step(self) -> None:
        t = self.trainer
        if not t.finishing and any(t.iter % p == 0 for p in self.write_periods):
            check_finite(t)

    def after_train(self) -> None:
        t = self.trainer
        if t.exception is None:
            check_finite(t)
        elif (isinstance(t.exception, Exception) and not isinstance(t.exception, FloatingPointError)
              and t.recorder.nonfinite_seen()):
            raise FloatingPointError(_nonfinite_message(t, None)) from t.exception


class PeriodicCheckpointer(HookBase):
    """Saves ``model_<iteration>`` every ``period`` iterations and the final state at the end.

    At the end: ``model_final`` after the last iteration, ``model_<iteration>`` when stopped early
    (the run can be resumed), nothing when the run was already complete.
    """

    def __init__(self, period: int) -> None:
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ValueError(f"PeriodicCheckpointer period must be an int > 0, got {period!r}")
        self.period = period

    def after_step(self) -> None:
        t = self.trainer
        if not t.finishing and t.iter % self.period == 0:
            t.save_checkpoint(f"model_{t.iter:07d}")

    def after_train(self) -> None:
        t = self.trainer
        if t.exception is not None:
            return
        if t.stop_reason is not None:
            _log.info("stopping early at iteration %d of %d: %s", t.iter, t.max_iter, t.stop_reason)
            t.save_checkpoint(f"model_{t.iter:07d}")
        elif t.iter > t.start_iter:
            t.save_checkpoint("model_final")
        else:
            _log.info("training was already complete at iteration %d", t.iter)


class EvalHook(HookBase):
    """Evaluates every ``period`` iterations (0: only at the end) and once at the end.

    ``eval_fn(model, iteration)`` gets the unwrapped model in eval mode (holding the EMA weights when the
    trainer has ``eval_with_ema``), under ``torch.no_grad()``,
    with every RNG state saved and restored around it, so the training trajectory does not depend
    on the evaluation period. The final results are in ``trainer.eval_results``.
    """

    def __init__(self, eval_fn: EvalFn, period: int = 0) -> None:
        if not callable(eval_fn):
            raise TypeError(f"eval_fn must be callable(model, iteration), got {type(eval_fn).__name__}")
        self.eval_fn = eval_fn
        self.period = period

    def after_step(self) -> None:
        t = self.trainer
        if self.period > 0 and not t.finishing and t.iter % self.period == 0:
            self.evaluate()

    def after_train(self) -> None:
        if self.trainer.exception is None:
            self.evaluate()

    def evaluate(self) -> dict[str, Any]:
        """Runs ``eval_fn`` now, logs the metrics and returns them."""
        t = self.trainer
        model = unwrap_model(t.model)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        # test.use_ema: the averaged weights are evaluated; the trained ones come back bit for bit after.
        weights = t.ema.swapped_into(model) if t.ema is not None and t.eval_with_ema else contextlib.nullcontext()
        try:
            with preserve_rng_states(), torch.no_grad(), weights:
                results = self.eval_fn(model, t.iter)
        finally:
            model.train(was_training)
        if results is None:
            results = {}
        if not isinstance(results, Mapping):
            raise TypeError(f"eval_fn must return a dict of metrics, got {type(results).__name__}")
        t.metrics_logger.log_eval(t.iter, results, time_s=time.perf_counter() - t.train_start)
        _log.info("evaluation took %.1f s", time.perf_counter() - t0)
        t.recorder.restart_clock()  # the evaluation's time must not count against the training speed
        t.eval_results = dict(results)
        return t.eval_results

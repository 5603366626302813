"""The trainer's hooks: everything periodic or exceptional around the training step.

A hook has four methods, called by :class:`~resnet_det.engine.trainer.TrainerBase` (each a no-op by
default): ``before_train``; per iteration ``before_step`` and ``after_step`` (``state.iter`` then
counts the completed iterations); ``after_train`` (always, also after an error: ``state.exception``
says which, and every hook's ``after_train`` runs even when an earlier one raised).

A hook reads and writes its trainer's :class:`~resnet_det.engine.state.TrainingState` (``self.state``, which
is ``self.trainer.state``) and calls :class:`~resnet_det.engine.trainer.TrainerBase`'s services
(``request_stop``, ``save_checkpoint``); nothing else of the trainer. So the hooks here work with any
``TrainerBase`` subclass that fills the state fields they read (each hook's docstring says which), and a
hook of your own is written the same way. A test reads this module and keeps it so
(tests/engine/test_trainer.py::test_the_hooks_read_the_state_and_no_trainer_internals).

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
    from .state import TrainingState
    from .trainer import TrainerBase

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
        trainer: The trainer (a weak proxy), set by ``trainer.register_hooks``: for its services
            (``request_stop``, ``save_checkpoint``) and its ``state``.
    """

    trainer: TrainerBase

    @property
    def state(self) -> TrainingState:
        """The trainer's :class:`~resnet_det.engine.state.TrainingState`: what a hook reads and writes."""
        return self.trainer.state

    def before_train(self) -> None:
        """Called once, before the first iteration."""

    def after_train(self) -> None:
        """Called once at the end, also after an error (``self.state.exception``)."""

    def before_step(self) -> None:
        """Called before each iteration."""

    def after_step(self) -> None:
        """Called after each iteration; ``self.state.iter`` counts it."""


# --------------------------------------------------------------------------------------------------
# Non-finite losses: shared by MetricsWriter (inside its all-reduce) and NonFiniteGuard
# --------------------------------------------------------------------------------------------------


def _latest(state: TrainingState) -> str | None:
    """The last checkpoint of the run, or None (none yet, or a loop without a checkpointer)."""
    return state.checkpointer.latest_or_none() if state.checkpointer is not None else None


def _nonfinite_message(state: TrainingState, first_iter: int | None) -> str:
    local = state.recorder.first_nonfinite()
    first = first_iter if first_iter is not None else (local[0] if local else -1)
    if local is not None and local[0] == first:
        detail = "loss values: " + ", ".join(f"{k}={v}" for k, v in local[1].items())
    else:
        detail = "the non-finite loss was on another process" + (
            f" (this one saw its first at iteration {local[0]})" if local else ""
        )
    last = _latest(state)
    kept = f"the last good checkpoint is '{last}' in {state.output_dir}" if last else "no checkpoint was saved yet"
    return (
        f"non-finite loss at iteration {first}; {detail}. Training stopped on every process; {kept}. "
        "Common causes: a learning rate too high for the batch size (lower solver.lr or lengthen "
        "solver.warmup_iters), fp16 overflow (try train.amp=bf16), or degenerate boxes in the data."
    )


def raise_nonfinite(state: TrainingState) -> None:
    """Raises ``FloatingPointError`` naming the first bad iteration of all processes (a collective)."""
    sentinel = 2**62
    local = state.recorder.first_nonfinite()
    first = torch.tensor([local[0] if local else sentinel], dtype=torch.int64, device=state.device)
    if state.world_size > 1:
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    raise FloatingPointError(_nonfinite_message(state, int(first.item())))


def check_finite(state: TrainingState) -> None:
    """Raises ``FloatingPointError`` on every process if any process saw a non-finite loss.

    A collective with several processes: call it at the same iterations on all of them.
    """
    flag = state.recorder.nonfinite_flag()
    if flag is None:  # no step recorded yet (on every process alike)
        return
    if state.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        raise_nonfinite(state)


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

    State: reads ``in_step``, ``iter``, ``updating``, ``recorder``, ``last_saved_iter``, ``exception``,
    ``checkpointer``; calls ``save_checkpoint``.
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
        if self.state.in_step and not self.requested:
            # No logging here: writing to a file the interrupted code may be writing to is unsafe.
            self.requested = True
            signal.signal(signal.SIGINT, self._prev)
            return
        raise KeyboardInterrupt

    def after_step(self) -> None:
        if self.requested:
            _log.info("Ctrl-C: stopping after iteration %d", self.state.iter)
            raise KeyboardInterrupt

    def after_train(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._prev)
            self._installed = False
        if isinstance(self.state.exception, KeyboardInterrupt):
            self._save_on_interrupt()

    def _save_on_interrupt(self) -> None:
        s = self.state
        if not is_main_process():
            return
        if s.updating:
            _log.warning("interrupted inside the optimizer update of iteration %d: the weights are half-updated, "
                         "so no checkpoint is saved; the last one is %s", s.iter + 1, _latest(s))
            return
        if s.recorder.nonfinite_seen():
            _log.warning("interrupted after a non-finite loss: not saving the weights; the last good checkpoint "
                         "is %s", _latest(s))
            return
        if s.last_saved_iter == s.iter and not s.in_step:
            _log.info("interrupted at iteration %d, which is already saved (%s)", s.iter,
                      _latest(s))
            return
        if s.in_step:
            _log.info("interrupted inside iteration %d: saving the state after iteration %d (the batch of the "
                      "unfinished iteration was consumed and is skipped on resume)", s.iter + 1, s.iter)
        # Other processes may not reach a collective now: save this rank's loader/RNG state only.
        self.trainer.save_checkpoint(f"model_{s.iter:07d}", gather=False)
        _log.info("interrupted at iteration %d; resume with train(resume=True) (tools: --resume)", s.iter)


class TimeLimit(HookBase):
    """Stops training cleanly (checkpoint, final evaluation) after ``max_time_minutes``.

    One process stops at the first iteration past the limit; several stop at the next logging
    period at which any of them is past it (the vote rides on :class:`MetricsWriter`'s all-reduce).

    State: reads ``train_start``, ``iter``, ``max_iter``; calls ``request_stop``.
    """

    def __init__(self, max_time_minutes: float) -> None:
        if not max_time_minutes > 0:
            raise ValueError(f"TimeLimit max_time_minutes must be > 0, got {max_time_minutes!r}")
        self.max_time_minutes = max_time_minutes
        self._start = time.perf_counter()

    def before_train(self) -> None:
        self._start = self.state.train_start

    def after_step(self) -> None:
        s = self.state
        if s.iter < s.max_iter and time.perf_counter() - self._start > self.max_time_minutes * 60.0:
            self.trainer.request_stop(
                f"the time limit of {self.max_time_minutes} minutes (train.max_time_minutes) was reached")


class MetricsWriter(HookBase):
    """Logs the averaged losses every ``period`` iterations (and on the last one) with one all-reduce.

    The all-reduce carries the loss sums, the non-finite flag and the stop votes: one host-device
    synchronisation per period, and every process learns the same things at the same iteration.
    A non-finite loss raises here, before the record is written.

    State: reads ``recorder``, ``device``, ``world_size``, ``stop_vote``, ``grad_norm``, ``scaler``, ``last_lr``,
    ``train_start``, ``iter``, ``max_iter``, ``exception``, ``metrics_logger``; writes ``stop_reason``,
    ``last_losses``, ``last_logged_iter``.
    """

    def __init__(self, period: int) -> None:
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ValueError(f"MetricsWriter period must be an int > 0, got {period!r}")
        self.period = period

    def after_step(self) -> None:
        s = self.state
        s.metrics_logger.advance()
        if s.iter % self.period == 0 or s.finishing:
            self.write()

    def after_train(self) -> None:
        s = self.state
        # Ctrl-C: with one process, log the partial period (several may not all reach a collective now).
        if isinstance(s.exception, KeyboardInterrupt) and s.world_size == 1 and s.recorder.period_iters > 0:
            self.write()

    def write(self) -> None:
        """Reduces, checks and logs the period's losses; applies an agreed stop."""
        s = self.state
        rec = s.recorder
        sums, counts = rec.period_sums()
        keys = sorted({k for ks in all_gather_object(sorted(sums)) for k in ks}) if s.world_size > 1 else sorted(sums)
        zero = torch.zeros((), device=s.device)
        flag = rec.nonfinite_flag()
        packed = torch.stack(
            [sums.get(k, zero) for k in keys]
            + [torch.tensor(float(counts.get(k, 0)), device=s.device) for k in keys]
            + [flag.reshape(()) if flag is not None else zero,
               torch.tensor(float(s.stop_vote is not None), device=s.device)]
        )
        if s.world_size > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        values = packed.tolist()  # the one host-device synchronisation of the period
        n = len(keys)
        if values[2 * n] > 0:
            raise_nonfinite(s)
        if values[2 * n + 1] > 0 and s.stop_reason is None:
            s.stop_reason = s.stop_vote or "another process asked to stop"
        losses = {k: values[i] / values[n + i] for i, k in enumerate(keys) if values[n + i] > 0}
        elapsed = time.perf_counter() - rec.period_start
        iters = max(1, rec.period_iters)
        extra: dict[str, float] = {}
        if s.grad_norm is not None:
            extra["grad_norm"] = float(s.grad_norm)
        if s.device.type == "cuda":
            extra["max_mem_mb"] = torch.cuda.max_memory_allocated(s.device) / 2**20
        if s.scaler is not None and s.scaler.is_enabled():
            extra["loss_scale"] = float(s.scaler.get_scale())
        if losses:
            s.last_losses = losses
            s.last_logged_iter = s.iter
            s.metrics_logger.log_train(
                s.iter, losses, lr=s.last_lr,
                images_per_sec=rec.period_images / elapsed if elapsed > 0 else 0.0,
                time_s=time.perf_counter() - s.train_start, data_time=rec.period_data_time / iters,
                eta_seconds=(s.max_iter - s.iter) * elapsed / iters, extra=extra,
            )
        rec.reset_period()
        raise_log_write_failure()  # log.txt on a full disk stops the run here, with one line naming it


class LossGrowthWarning(HookBase):
    """Warns once, naming the iteration, when a logged total loss is ``factor`` times the first one logged.

    A finite loss that grows by orders of magnitude (a backbone with frozen BN and no pretrained weights, a
    learning rate too high) stops nothing by itself; this says so in the log. It reads the losses
    :class:`MetricsWriter` has just logged (Python floats, already on every process alike): no synchronisation
    of its own. Register it after :class:`MetricsWriter`.

    State: reads ``last_losses``, ``last_logged_iter``, ``iter``.
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
        s = self.state
        if self.warned or s.last_logged_iter != s.iter or not s.last_losses:
            return
        total = float(sum(s.last_losses.values()))
        if not math.isfinite(total):
            return  # a non-finite loss is MetricsWriter's error, not a warning
        if self.first is None:
            self.first = (s.iter, total)
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
                    total, s.iter, total / first, first, first_iter)


class NonFiniteGuard(HookBase):
    """The collective non-finite check before anything is written.

    Runs at the iterations where the hooks after it write (``write_periods``: the checkpoint and
    evaluation periods) and at the end, before the final checkpoint. After an error, when this
    process had seen a NaN, raises ``FloatingPointError`` from that error: a crash right after a
    NaN (NaN boxes in a later op) is reported as what it is.

    State: reads ``recorder``, ``device``, ``world_size``, ``iter``, ``exception``, ``checkpointer``,
    ``output_dir``.
    """

    def __init__(self, write_periods: Sequence[int]) -> None:
        self.write_periods = tuple(p for p in write_periods if p > 0)

    def after_step(self) -> None:
        s = self.state
        if not s.finishing and any(s.iter % p == 0 for p in self.write_periods):
            check_finite(s)

    def after_train(self) -> None:
        s = self.state
        if s.exception is None:
            check_finite(s)
        elif (isinstance(s.exception, Exception) and not isinstance(s.exception, FloatingPointError)
              and s.recorder.nonfinite_seen()):
            raise FloatingPointError(_nonfinite_message(s, None)) from s.exception


class PeriodicCheckpointer(HookBase):
    """Saves ``model_<iteration>`` every ``period`` iterations and the final state at the end.

    At the end: ``model_final`` after the last iteration, ``model_<iteration>`` when stopped early
    (the run can be resumed), nothing when the run was already complete.

    State: reads ``iter``, ``start_iter``, ``max_iter``, ``stop_reason``, ``exception``; calls
    ``save_checkpoint``.
    """

    def __init__(self, period: int) -> None:
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ValueError(f"PeriodicCheckpointer period must be an int > 0, got {period!r}")
        self.period = period

    def after_step(self) -> None:
        s = self.state
        if not s.finishing and s.iter % self.period == 0:
            self.trainer.save_checkpoint(f"model_{s.iter:07d}")

    def after_train(self) -> None:
        s = self.state
        if s.exception is not None:
            return
        if s.stop_reason is not None:
            _log.info("stopping early at iteration %d of %d: %s", s.iter, s.max_iter, s.stop_reason)
            self.trainer.save_checkpoint(f"model_{s.iter:07d}")
        elif s.iter > s.start_iter:
            self.trainer.save_checkpoint("model_final")
        else:
            _log.info("training was already complete at iteration %d", s.iter)


class EvalHook(HookBase):
    """Evaluates every ``period`` iterations (0: only at the end) and once at the end.

    ``eval_fn(model, iteration)`` gets the unwrapped ``state.model`` in eval mode (holding the EMA weights,
    ``state.ema``, with ``use_ema``), under ``torch.no_grad()``,
    with every RNG state saved and restored around it, so the training trajectory does not depend
    on the evaluation period. The final results are in ``state.eval_results``.

    State: reads ``model``, ``ema`` (with ``use_ema``), ``iter``, ``exception``, ``train_start``, ``recorder``,
    ``metrics_logger``; writes ``eval_results``.
    """

    def __init__(self, eval_fn: EvalFn, period: int = 0, *, use_ema: bool = False) -> None:
        if not callable(eval_fn):
            raise TypeError(f"eval_fn must be callable(model, iteration), got {type(eval_fn).__name__}")
        if not isinstance(period, int) or isinstance(period, bool) or period < 0:
            raise ValueError(f"EvalHook period must be an int >= 0 (0: only at the end), got {period!r}")
        self.eval_fn = eval_fn
        self.period = period
        self.use_ema = use_ema

    def after_step(self) -> None:
        s = self.state
        if self.period > 0 and not s.finishing and s.iter % self.period == 0:
            self.evaluate()

    def after_train(self) -> None:
        if self.state.exception is None:
            self.evaluate()

    def evaluate(self) -> dict[str, Any]:
        """Runs ``eval_fn`` now, logs the metrics and returns them."""
        s = self.state
        if s.model is None:
            raise ValueError("EvalHook needs the trained model in the trainer's state (state.model); the loop sets it")
        if self.use_ema and s.ema is None:
            raise ValueError("EvalHook use_ema=True needs the weights' EMA in the trainer's state (state.ema; "
                             "train.ema in a config)")
        model = unwrap_model(s.model)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        # test.use_ema: the averaged weights are evaluated; the trained ones come back bit for bit after.
        weights = s.ema.swapped_into(model) if s.ema is not None and self.use_ema else contextlib.nullcontext()
        try:
            with preserve_rng_states(), torch.no_grad(), weights:
                results = self.eval_fn(model, s.iter)
        finally:
            model.train(was_training)
        if results is None:
            results = {}
        if not isinstance(results, Mapping):
            raise TypeError(f"eval_fn must return a dict of metrics, got {type(results).__name__}")
        s.metrics_logger.log_eval(s.iter, results, time_s=time.perf_counter() - s.train_start)
        _log.info("evaluation took %.1f s", time.perf_counter() - t0)
        s.recorder.restart_clock()  # the evaluation's time must not count against the training speed
        s.eval_results = dict(results)
        return s.eval_results

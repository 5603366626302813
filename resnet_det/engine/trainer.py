"""The training loop: a small loop with hooks (:class:`TrainerBase`) and the detector's step (:class:`Trainer`).

``TrainerBase.train()`` is ``before_train``; for each iteration ``before_step``, ``run_step``,
``after_step``; ``after_train``. ``Trainer.run_step()`` is only the step: data, forward under
autocast, backward, clipping, optimizer and LR-schedule steps, and the on-device recording of the
loss values. Everything periodic or exceptional is a hook (:mod:`.hooks`, where their order is
explained): Ctrl-C, time limit, metrics logging, the non-finite guard, checkpoints, evaluation.

Invariants (each proven by the test named):

- Exact resume: a run resumed from a checkpoint repeats the uninterrupted run bit for bit (weights,
  optimizer state, learning rate, data order, every RNG). The step consumes randomness only in
  the model and the loader; hooks consume none (evaluation restores the RNG states). Proof:
  tests/engine/test_trainer.py::test_resume_continues_exactly_like_an_uninterrupted_run,
  test_cuda.py::test_resume_on_cuda_is_exact_including_the_cuda_rng, test_distributed.py (per-rank
  loader position and RNG state); on the real stack (the command, the real loader with workers), killed
  inside a checkpoint write: tests/reliability/test_kill_during_checkpoint.py, test_ddp_failure.py.
- No host-device synchronisation in a step: the losses are summed and the first non-finite step is
  tracked with device ops (:class:`LossRecorder`); they are read once per logging period.
  Proof: test_cuda.py::test_training_steps_do_not_synchronise_with_the_host.
- A NaN stops all processes with the iteration and the loss values, before anything is written
  (the deferred check, :class:`~.hooks.NonFiniteGuard` and :class:`~.hooks.MetricsWriter`).
  Proof: test_trainer.py::test_non_finite_loss_names_iteration_and_losses_and_keeps_the_last_checkpoint,
  ::test_an_error_after_a_nan_is_reported_as_the_nan, test_distributed.py.
- Every process takes the same decisions at the same iterations, so collectives never deadlock: a
  stop is requested locally and agreed through the logging all-reduce (:meth:`Trainer.request_stop`).
  Proof: test_distributed.py (a NaN, and a time limit, on one of two ranks stop both at the same
  iteration), test_trainer.py::test_time_limit_stops_checkpoints_evaluates_and_says_so. A process that
  dies or hangs is not a decision: the others fail within train.dist_timeout_minutes with one line
  (tests/reliability/test_ddp_failure.py).
- Evaluation does not change the RNG trajectory.
  Proof: test_trainer.py::test_evaluation_does_not_change_the_training_trajectory.
- Ctrl-C during a step is deferred to its end; the checkpoint written on the way out is an exact
  resume point. Proof: test_trainer.py::test_ctrl_c_saves_at_the_current_iteration_and_resumes_exactly,
  ::test_keyboard_interrupt_inside_a_step_saves_the_last_completed_iteration.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resnet_det_common import (
    AMP_DTYPES,
    autocast,
    barrier,
    check_autocast,
    get_rank,
    get_world_size,
    is_main_process,
    logging_scope,
    resolve_device,
    wrap_ddp,
    writing,
)

from ..config import Config, dump_config
from .checkpoint import Checkpointer, make_trainer_state
from .ema import ModelEma
from .hooks import (
    EvalFn,
    EvalHook,
    HookBase,
    InterruptHook,
    LossGrowthWarning,
    MetricsWriter,
    NonFiniteGuard,
    PeriodicCheckpointer,
    TimeLimit,
)
from .logger import MetricsLogger, flatten_metrics
from .solver import build_lr_scheduler, build_optimizer

__all__ = ["AMP_DTYPES", "EvalFn", "LossRecorder", "ModelEma", "Trainer", "TrainerBase", "build_trainer",
           "check_global_batch", "check_sync_batchnorm"]

_log = logging.getLogger(__name__)

_SCHEDULER_WARNING = r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"


class TrainerBase:
    """A loop with hooks: ``before_train``; per iteration ``before_step``, ``run_step``, ``after_step``;
    ``after_train``.

    ``iter`` counts completed iterations: during ``run_step`` iteration ``iter + 1`` runs, and
    ``after_step`` sees it counted. The loop ends at ``max_iter`` or when ``stop_reason`` is set.

    Attributes:
        iter: Completed iterations.
        start_iter: Where this ``train()`` call started.
        max_iter: Iteration to train up to.
        in_step: True from the start of ``run_step`` until the iteration is counted.
        stop_reason: Why the loop stops before ``max_iter`` (set by a hook), or None.
        exception: The error the loop or a hook raised, or None; what ``after_train`` hooks look at.
    """

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self.iter = 0
        self.start_iter = 0
        self.max_iter = 0
        self.in_step = False
        self.stop_reason: str | None = None
        self.exception: BaseException | None = None

    @property
    def hooks(self) -> tuple[HookBase, ...]:
        """The registered hooks, in the order they run."""
        return tuple(self._hooks)

    @property
    def finishing(self) -> bool:
        """True after the loop's last iteration: the hooks' final work is then done in ``after_train``."""
        return self.iter >= self.max_iter or self.stop_reason is not None

    def register_hooks(self, hooks: Iterable[HookBase | None]) -> None:
        """Appends hooks (None entries are skipped); they run after those registered before."""
        for hook in hooks:
            if hook is None:
                continue
            if not isinstance(hook, HookBase):
                raise TypeError(f"register_hooks takes HookBase instances, got {type(hook).__name__}")
            # A proxy: the trainer holds its hooks, a hook must not keep its trainer alive.
            hook.trainer = weakref.proxy(self)  # type: ignore[assignment]
            self._hooks.append(hook)

    def train(self) -> None:
        """Runs iterations ``iter + 1 .. max_iter`` (fewer if a hook sets ``stop_reason``)."""
        self.exception = None
        self.stop_reason = None
        try:
            self.before_train()
            while self.iter < self.max_iter and self.stop_reason is None:
                self.before_step()
                self.in_step = True
                self.run_step()
                self.iter += 1
                self.in_step = False
                self.after_step()
        except BaseException as exc:
            self.exception = exc
            raise
        finally:
            self.after_train()
            self.in_step = False

    def run_step(self) -> Any:
        """One iteration; subclasses implement it."""
        raise NotImplementedError

    def before_train(self) -> None:
        for hook in self._hooks:
            hook.before_train()

    def before_step(self) -> None:
        for hook in self._hooks:
            hook.before_step()

    def after_step(self) -> None:
        for hook in self._hooks:
            hook.after_step()

    def after_train(self) -> None:
        """Every hook's ``after_train``, even after one of them raised (the later ones then see the
        error in ``exception``); the first error is raised at the end."""
        error: BaseException | None = None
        for hook in self._hooks:
            try:
                hook.after_train()
            except BaseException as exc:
                error = error or exc
                self.exception = exc
        if error is not None:
            raise error


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


def _as_scalar_losses(loss_dict: Any) -> dict[str, Tensor]:
    if not isinstance(loss_dict, Mapping) or not loss_dict:
        raise TypeError(
            "in training mode the model must return a non-empty dict[str, Tensor] of losses, got "
            f"{type(loss_dict).__name__}"
        )
    for key, value in loss_dict.items():
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"loss {key!r} must be a scalar tensor, got {shape}")
    return dict(loss_dict)


class Trainer(TrainerBase):
    """Trains a detector (torchvision convention) with checkpoints, resume and evaluation.

    Its hooks (see :mod:`.hooks`): :class:`~.hooks.InterruptHook`, :class:`~.hooks.TimeLimit`
    (with ``max_time_minutes``), :class:`~.hooks.MetricsWriter`, :class:`~.hooks.NonFiniteGuard`,
    :class:`~.hooks.PeriodicCheckpointer`, :class:`~.hooks.EvalHook` (with ``eval_fn``); more with
    :meth:`register_hooks` (they run after these).

    Args:
        model: The model on ``device``, possibly wrapped by :func:`~resnet_det_common.wrap_ddp`.
            ``model(images, targets)`` returns a dict of scalar losses in training mode.
        optimizer: Its optimizer.
        scheduler: Per-iteration learning-rate scheduler (``step()`` after each optimizer step).
        train_loader: An endless iterable of ``(images: list[Tensor[3,H,W]], targets: list[dict])``
            with ``state_dict()`` / ``load_state_dict()`` giving its position (batches consumed).
        device: This process's device.
        max_iter: Iteration to train up to.
        output_dir: Folder for checkpoints, logs (``log.txt``, ``metrics.jsonl``) and curves.
        amp: ``"bf16"``, ``"fp16"`` (with a gradient scaler) or ``"off"``.
        clip_grad_norm: Clip the global gradient norm (after unscaling); None disables.
        checkpoint_period: Save ``model_<iteration>`` every this many iterations; ``model_final``
            is always saved at the end.
        keep_checkpoints: Periodic checkpoints kept on disk.
        eval_fn: ``eval_fn(model, iteration) -> metrics``: called on every process with the
            unwrapped model in eval mode; returns (possibly nested) metrics on the main process
            ({} elsewhere is fine). None: no evaluation.
        eval_period: Evaluate every this many iterations (0 = only at the end).
        log_period: Log averaged losses every this many iterations.
        max_time_minutes: Stop cleanly (checkpoint, evaluate) after this long; None = no limit.
            Checked every iteration with one process, every ``log_period`` iterations with several
            (the processes must agree on when to stop).
        grad_scaler_enabled: Use a GradScaler; default: only for ``amp="fp16"``.
        tensorboard: Also write TensorBoard events.
        progress: Show a progress bar on the main process (only when stderr is a terminal; the
            periodic log lines are the progress otherwise).
        curves: Draw ``curves.png`` when training ends.
        accumulate: Gradient accumulation: an iteration is ``accumulate`` forward/backward passes over
            consecutive loader batches (each loss divided by ``accumulate``: the gradient of the mean over
            all of them), then one optimizer step. Iterations, the LR schedule, logging and checkpoints count
            optimizer steps; under DDP the inner passes skip the gradient all-reduce (``no_sync``).
        ema: An EMA of the weights (:class:`~.ema.ModelEma`), updated after every optimizer step and
            stored in the checkpoints; ``model_final_ema.safetensors`` holds it at the end.
        eval_with_ema: Evaluate the EMA weights instead of the trained ones (``test.use_ema``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_loader: Any,
        *,
        device: torch.device | str,
        max_iter: int,
        output_dir: str | Path,
        amp: str = "off",
        clip_grad_norm: float | None = None,
        checkpoint_period: int = 5000,
        keep_checkpoints: int = 3,
        eval_fn: EvalFn | None = None,
        eval_period: int = 0,
        log_period: int = 20,
        max_time_minutes: float | None = None,
        grad_scaler_enabled: bool | None = None,
        tensorboard: bool = False,
        progress: bool = True,
        curves: bool = True,
        accumulate: int = 1,
        ema: ModelEma | None = None,
        eval_with_ema: bool = False,
    ) -> None:
        super().__init__()

        def positive(name: str, value: Any, allow_zero: bool = False) -> None:
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                raise ValueError(f"Trainer {name} must be an int {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        positive("max_iter", max_iter)
        positive("checkpoint_period", checkpoint_period)
        positive("keep_checkpoints", keep_checkpoints)
        positive("eval_period", eval_period, allow_zero=True)
        positive("log_period", log_period)
        positive("accumulate", accumulate)
        if ema is not None and not isinstance(ema, ModelEma):
            raise TypeError(f"Trainer ema must be a resnet_det.engine.ModelEma or None, got {type(ema).__name__}")
        if eval_with_ema and ema is None:
            raise ValueError("Trainer eval_with_ema=True needs an EMA (train.ema: {decay: ...}); test.use_ema=true "
                             "without train.ema has no averaged weights to evaluate")
        if amp not in AMP_DTYPES:
            raise ValueError(f"Trainer amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"Trainer clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        if max_time_minutes is not None and not max_time_minutes > 0:
            raise ValueError(f"Trainer max_time_minutes must be > 0 or None, got {max_time_minutes!r}")
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError(f"Trainer eval_fn must be callable(model, iteration), got {type(eval_fn).__name__}")
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(train_loader, method, None)):
                raise TypeError(
                    f"the train loader ({type(train_loader).__name__}) needs {method}() so that a resumed "
                    "run continues the same data order"
                )

        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.device = torch.device(device)
        self.max_iter = max_iter
        self.output_dir = Path(output_dir)
        self.amp = amp
        self.amp_dtype = AMP_DTYPES[amp]
        check_autocast(self.device, amp)
        self.clip_grad_norm = clip_grad_norm
        self.checkpoint_period = checkpoint_period
        self.eval_fn = eval_fn
        self.eval_period = eval_period
        self.log_period = log_period
        self.max_time_minutes = max_time_minutes
        self.tensorboard = tensorboard
        self.progress = progress
        self.curves = curves
        self.accumulate = accumulate
        self.ema = ema
        self.eval_with_ema = eval_with_ema
        use_scaler = amp == "fp16" if grad_scaler_enabled is None else grad_scaler_enabled
        try:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(
                f"a gradient scaler (train.amp=fp16) is not available on {self.device.type} with torch "
                f"{torch.__version__}: {err}; use train.amp=bf16 or off"
            ) from err
        self.checkpointer = Checkpointer(self.output_dir, keep=keep_checkpoints)
        self.world_size = get_world_size()
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

        # State shared with the hooks.
        self.recorder = LossRecorder(self.device)
        self.metrics_logger: MetricsLogger = MetricsLogger(self.output_dir, max_iter=max_iter, enabled=False)
        self.train_start = time.perf_counter()
        self.last_lr = float(optimizer.param_groups[0]["lr"])
        self.last_losses: dict[str, float] = {}
        self.last_logged_iter = -1  # the iteration MetricsWriter last logged (LossGrowthWarning reads its losses)
        self.grad_norm: Tensor | None = None
        self.updating = False  # inside the optimizer update: a Ctrl-C there leaves half-updated weights
        self.last_saved_iter = -1
        self.stop_vote: str | None = None
        self.eval_results: dict[str, Any] = {}
        self._data_iter: Iterator[Any] | None = None

        self.register_hooks([
            InterruptHook(),
            TimeLimit(max_time_minutes) if max_time_minutes is not None else None,
            MetricsWriter(log_period),
            NonFiniteGuard(write_periods=(checkpoint_period, eval_period if eval_fn is not None else 0)),
            PeriodicCheckpointer(checkpoint_period),
            EvalHook(eval_fn, eval_period) if eval_fn is not None else None,
        ])

    # ----------------------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------------------

    def run_step(self) -> dict[str, Tensor]:
        """One iteration: data, forward (autocast), backward, clip, optimizer and LR steps.

        Returns:
            The detached loss terms of this step (on the device; reading them synchronises).
        """
        if self.accumulate == 1:
            images, targets = self._next_batch()
            with autocast(self.device, self.amp):
                loss_dict = _as_scalar_losses(self.model(images, targets))
            # Losses are summed in float32 even under autocast: a bf16 sum of several terms loses digits.
            losses = torch.stack([v.reshape(()).float() for v in loss_dict.values()])
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses.sum()).backward()
            keys = tuple(loss_dict)
        else:
            keys, losses = self._accumulate_gradients()
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
        self.updating = True
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self._scheduler_step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.updating = False
        values = losses.detach()
        self.recorder.record(keys, values, iteration=self.iter + 1)
        return dict(zip(keys, values.unbind(0)))

    def _accumulate_gradients(self) -> tuple[tuple[str, ...], Tensor]:
        """``accumulate`` forward/backward passes into the gradients; returns the mean loss terms.

        Each pass's loss is divided by ``accumulate``, so the gradient is the mean over the passes: for a
        model without batch statistics, the gradient of one pass over all their images. Under DDP the
        passes before the last run in ``no_sync()``: the gradients are all-reduced once per optimizer step.
        """
        k = self.accumulate
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        no_sync = getattr(self.model, "no_sync", None)
        for micro in range(k):
            images, targets = self._next_batch()
            inner = micro < k - 1 and callable(no_sync)
            with no_sync() if inner else contextlib.nullcontext():  # type: ignore[misc]
                with autocast(self.device, self.amp):
                    loss_dict = _as_scalar_losses(self.model(images, targets))
                losses = torch.stack([v.reshape(()).float() for v in loss_dict.values()])
                self.scaler.scale(losses.sum() / k).backward()
            for name, value in zip(loss_dict, losses.detach().unbind(0)):
                sums[name] = sums[name] + value if name in sums else value
        return tuple(sums), torch.stack(list(sums.values())) / k

    def _scheduler_step(self) -> None:
        if self.scaler.is_enabled():
            # A skipped first step (fp16 overflow) makes torch warn about the call order; expected.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_SCHEDULER_WARNING)
                self.scheduler.step()
        else:
            self.scheduler.step()

    def _next_batch(self) -> tuple[Any, list[dict[str, Any]]]:
        """The next batch, checked and moved to the device (the wait is counted as data time)."""
        if self._data_iter is None:
            self._data_iter = iter(self.train_loader)
        t0 = time.perf_counter()
        batch = next(self._data_iter)
        self.recorder.period_data_time += time.perf_counter() - t0
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"the train loader must yield (images, targets) pairs, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        images, targets = batch
        if len(targets) != len(images):
            raise ValueError(f"a batch has {len(images)} images but {len(targets)} targets")
        self.recorder.period_images += len(images) * self.world_size
        return self._to_device(images, targets)

    def _to_device(self, images: Any, targets: Sequence[Mapping[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
        if isinstance(images, Tensor):
            images = images.to(self.device, non_blocking=True)
        else:
            images = [img.to(self.device, non_blocking=True) for img in images]
        moved = [
            # Every tensor a target holds (a new task's fields need no list here); other entries (image ids,
            # sizes) are passed on as they are.
            {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in target.items()}
            for target in targets
        ]
        return images, moved

    # ----------------------------------------------------------------------------------------------
    # Services for the hooks
    # ----------------------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stops the loop after this iteration, cleanly (checkpoint, final evaluation).

        With one process at once. With several, the request is a vote carried by the next logging
        all-reduce (:class:`~.hooks.MetricsWriter`), so that every process stops at the same
        iteration.
        """
        if self.world_size == 1:
            self.stop_reason = reason
        elif self.stop_vote is None:
            self.stop_vote = reason

    def save_checkpoint(self, name: str, *, gather: bool = True) -> None:
        """Saves the weights and the trainer state as ``name`` (rank 0 writes; ``gather`` collects
        every rank's loader/RNG state and is then a collective)."""
        extra: dict[str, Any] = {"max_iter": self.max_iter}
        if self.accumulate > 1:
            extra["accumulate"] = self.accumulate
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        state = make_trainer_state(
            self.iter, self.optimizer, self.scheduler, self.scaler, self.train_loader, gather=gather, extra=extra,
        )
        path = self.checkpointer.save(name, self.model, state)
        if path is not None and self.ema is not None and name == "model_final":
            ema_path = self.checkpointer.export_weights(f"{name}_ema", self.ema.weights(), iteration=self.iter)
            _log.info("saved the EMA weights %s (iteration %d)", ema_path.name, self.iter)
        self.last_saved_iter = self.iter
        if path is not None:
            _log.info("saved checkpoint %s (iteration %d)", path.name, self.iter)

    # ----------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------

    def train(self, resume: bool = False) -> dict[str, Any]:  # type: ignore[override]
        """Trains to ``max_iter`` (or the time limit), saving checkpoints and evaluating.

        While it runs, the project's log records go to the console and (main process) to
        ``<output_dir>/log.txt`` (:func:`~resnet_det_common.logging_scope`).

        Args:
            resume: Continue from the checkpoint in ``last_checkpoint`` (same iteration, learning
                rate, RNG states and data order); without one, start from scratch.

        Returns:
            ``{"iteration", "max_iter", "stopped_early", "time_seconds", "losses", "eval"}``:
            the last averaged losses and the final evaluation metrics (flattened).

        Raises:
            FloatingPointError: A loss became NaN or infinite (on every process).
            KeyboardInterrupt: After saving a checkpoint at the current iteration.
        """
        with logging_scope(self.output_dir, rank=get_rank()):
            self.train_start = time.perf_counter()
            self.start_iter = 0
            if resume:
                self.start_iter = self.checkpointer.resume(
                    self.model, self.optimizer, self.scheduler, self.scaler, self.train_loader, ema=self.ema
                )
            latest = self.checkpointer.resumed_from if resume else None
            self.iter = self.start_iter
            self.last_saved_iter = self.start_iter if latest else -1
            self.last_lr = float(self.optimizer.param_groups[0]["lr"])
            self.recorder = LossRecorder(self.device)
            self.stop_vote = None
            self.eval_results = {}
            self._data_iter = None
            if resume:
                _log.info(f"resumed from {latest} at iteration {self.start_iter}" if latest
                          else f"no checkpoint in {self.output_dir}; starting from scratch")
            _log.info("training iterations %d..%d on %s (%d process%s, amp=%s)", self.start_iter + 1, self.max_iter,
                      self.device, self.world_size, "es" if self.world_size > 1 else "", self.amp)
            self.metrics_logger = MetricsLogger(self.output_dir, max_iter=self.max_iter, start_iter=self.start_iter,
                                                tensorboard=self.tensorboard, progress=self.progress)
            self.model.train()
            try:
                super().train()
                barrier()  # when train() returns on any process, rank 0's final checkpoint is on disk
            except BaseException:
                self._data_iter = None  # lets the loader's worker processes shut down
                self.metrics_logger.close(plot=self.curves)  # a write error now is a warning: the first error wins
                raise
            self._data_iter = None
            self.metrics_logger.close(plot=self.curves, strict=True)  # curves.png on a full disk fails the run
            total = time.perf_counter() - self.train_start
            stopped_early = self.stop_reason is not None
            if stopped_early:
                _log.info("stopped early after %.1f min; resume with train(resume=True) (tools: --resume)", total / 60)
            else:
                _log.info("training finished: iteration %d in %.1f min", self.iter, total / 60)
        return {
            "iteration": self.iter,
            "max_iter": self.max_iter,
            "stopped_early": stopped_early,
            "time_seconds": total,
            "losses": dict(self.last_losses),
            "eval": flatten_metrics(self.eval_results),
        }


def check_global_batch(cfg: Config, world: int) -> None:
    """Raises ValueError unless ``solver.ims_per_batch`` splits over ``world`` processes and ``solver.accumulate``
    passes (each pass of each process then loads ``ims_per_batch / (world * accumulate)`` images)."""
    k = cfg.solver.accumulate
    per = world * k
    if cfg.solver.ims_per_batch % per != 0:
        raise ValueError(
            f"solver.ims_per_batch={cfg.solver.ims_per_batch} is the global batch and must be divisible by "
            f"the number of processes ({world})" + (f" times solver.accumulate ({k})" if k > 1 else "")
            + f"; e.g. solver.ims_per_batch={per * max(1, cfg.solver.ims_per_batch // per)}"
        )


#: Device types whose tensors torch's nn.SyncBatchNorm synchronises (it refuses CPU tensors in a process group).
SYNC_BN_DEVICES = ("cuda", "xpu", "hpu")


def check_sync_batchnorm(model: nn.Module, device: torch.device | str, world: int) -> None:
    """Raises ValueError when ``model`` has SyncBatchNorm layers that cannot run: several processes on a device
    torch does not synchronise BatchNorm on (the CPU with gloo). With one process SyncBatchNorm is plain
    BatchNorm and runs anywhere."""
    device = torch.device(device)
    if world <= 1 or device.type in SYNC_BN_DEVICES:
        return
    names = [name for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    if names:
        raise ValueError(
            f"SyncBN needs CUDA: torch {torch.__version__}'s nn.SyncBatchNorm synchronises only GPU (CUDA/XPU) "
            f"tensors, and this run has {world} processes on {device.type} ({len(names)} SyncBatchNorm layers, e.g. "
            f"{names[0]}). Set the norm that asks for it (model.backbone.norm / model.fpn.norm / "
            "model.roi.box_head_norm / model.mask.norm / model.semantic.norm) to BN (per-process statistics), GN "
            "or FrozenBN on the CPU, or train on GPUs"
        )


def build_trainer(
    cfg: Config,
    model: nn.Module,
    train_loader: Any,
    *,
    eval_fn: EvalFn | None = None,
    progress: bool = True,
) -> Trainer:
    """Builds the Trainer of a config: device, optimizer, schedule, DDP, precision, periods.

    Call :func:`~resnet_det_common.init_distributed` (before building the loader) and
    :func:`~resnet_det_common.seed_everything` (before building the model) first. This moves the
    model to the device (channels_last if ``train.channels_last``), builds the optimizer and the
    schedule, the weights' EMA (``train.ema``), wraps the model in DDP when several processes run, and
    writes the resolved config to ``<output_dir>/config.yaml`` on the main process. Beyond the
    :class:`Trainer`'s own hooks, registers :class:`~.hooks.LossGrowthWarning` (a loss grown by orders of
    magnitude is reported with its iteration). ``train.compile`` is left to the model builder, which knows
    which parts compile well.

    Args:
        cfg: The experiment config.
        model: The (unwrapped) detector, on any device.
        train_loader: The endless training loader (see :class:`Trainer`); with ``solver.accumulate`` k,
            its batches hold ``solver.ims_per_batch / k`` images over all processes.
        eval_fn: Evaluation callback (see :class:`Trainer`).
        progress: Show a progress bar.

    Returns:
        The trainer; call ``train(resume=...)``.
    """
    check_global_batch(cfg, get_world_size())
    k = cfg.solver.accumulate
    if cfg.test.use_ema and cfg.train.ema is None:
        raise ValueError("test.use_ema=true needs train.ema (e.g. train.ema={decay: 0.9998, warmup_iters: 2000}): "
                         "without it there are no averaged weights to evaluate")
    device = resolve_device(cfg.train.device)
    check_sync_batchnorm(model, device, get_world_size())
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.solver)
    scheduler = build_lr_scheduler(optimizer, cfg.solver)
    ema = (ModelEma(model, decay=cfg.train.ema.decay, warmup_iters=cfg.train.ema.warmup_iters)
           if cfg.train.ema is not None else None)
    model = wrap_ddp(model, device)
    if is_main_process():
        config_path = Path(cfg.train.output_dir) / "config.yaml"
        with writing(config_path, "config file"):
            dump_config(cfg, config_path)
    trainer = Trainer(
        model,
        optimizer,
        scheduler,
        train_loader,
        device=device,
        max_iter=cfg.solver.max_iter,
        output_dir=cfg.train.output_dir,
        amp=cfg.train.amp,
        clip_grad_norm=cfg.solver.clip_grad_norm,
        checkpoint_period=cfg.train.checkpoint_period,
        keep_checkpoints=cfg.train.keep_checkpoints,
        eval_fn=eval_fn,
        eval_period=cfg.train.eval_period,
        log_period=cfg.train.log_period,
        max_time_minutes=cfg.train.max_time_minutes,
        tensorboard=cfg.train.tensorboard,
        progress=progress,
        accumulate=k,
        ema=ema,
        eval_with_ema=cfg.test.use_ema,
    )
    # After the standard hooks: it reads the losses MetricsWriter logged at the same iteration.
    trainer.register_hooks([LossGrowthWarning()])
    return trainer

"""The training loop: mixed precision, checkpoints, resume, evaluation, logging, DDP.

Design notes (why the loop looks the way it does):

- No host-device synchronisation in a training step. Loss values are accumulated on the device and
  read (and all-reduced across processes) once every ``log_period`` iterations. The non-finite-loss
  check is deferred the same way: the first bad iteration and its loss values are recorded with
  device ops and inspected at the next log, checkpoint, evaluation or the end, always *before*
  anything is written, so a NaN never reaches a checkpoint.
- Every process takes the same decisions at the same iterations (log, checkpoint, evaluate, stop),
  so collectives never deadlock: the time limit is agreed on through the logging all-reduce.
- Ctrl-C during a step is deferred to the end of that step, so the checkpoint written on the way
  out is an exact resume point (a second Ctrl-C interrupts at once).
- Evaluation runs with the RNG states saved and restored around it, so the training trajectory
  does not depend on the evaluation period, and a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from resnet_det.common import (
    AMP_DTYPES,
    all_gather_object,
    autocast,
    barrier,
    check_autocast,
    get_world_size,
    is_main_process,
    preserve_rng_states,
    resolve_device,
    unwrap_model,
    wrap_ddp,
)

from ..config import Config, dump_config
from .checkpoint import Checkpointer, make_trainer_state
from .logger import MetricsLogger, flatten_metrics
from .solver import build_lr_scheduler, build_optimizer

__all__ = ["AMP_DTYPES", "EvalFn", "Trainer", "build_trainer"]

EvalFn = Callable[[nn.Module, int], Mapping[str, Any]]
"""``eval_fn(model, iteration) -> results``: called on every process with the unwrapped model in
eval mode; returns (possibly nested) metrics on the main process ({} elsewhere is fine)."""

_SCHEDULER_WARNING = r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"


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


class Trainer:
    """Trains a detector (torchvision convention) with checkpoints, resume and evaluation.

    Args:
        model: The model on ``device``, possibly wrapped by :func:`~detection.engine.wrap_ddp`.
            ``model(images, targets)`` returns a dict of scalar losses in training mode.
        optimizer: Its optimizer.
        scheduler: Per-iteration learning-rate scheduler (``step()`` after each optimizer step).
        train_loader: An endless iterable of ``(images: list[Tensor[3,H,W]], targets: list[dict])``
            with ``state_dict()`` / ``load_state_dict()`` giving its position (batches consumed).
        device: This process's device.
        max_iter: Iteration to train up to.
        output_dir: Folder for checkpoints, logs and curves.
        amp: ``"bf16"``, ``"fp16"`` (with a gradient scaler) or ``"off"``.
        clip_grad_norm: Clip the global gradient norm (after unscaling); None disables.
        checkpoint_period: Save ``model_<iteration>`` every this many iterations; ``model_final``
            is always saved at the end.
        keep_checkpoints: Periodic checkpoints kept on disk.
        eval_fn: ``eval_fn(model, iteration) -> metrics`` (see :data:`EvalFn`), or None.
        eval_period: Evaluate every this many iterations (0 = only at the end).
        log_period: Log averaged losses every this many iterations.
        max_time_minutes: Stop cleanly (checkpoint, evaluate) after this long; None = no limit.
            Checked every iteration with one process, every ``log_period`` iterations with several
            (the processes must agree on when to stop).
        grad_scaler_enabled: Use a GradScaler; default: only for ``amp="fp16"``.
        tensorboard: Also write TensorBoard events.
        progress: Show a progress bar on the main process.
        curves: Draw ``curves.png`` when training ends.
    """

    #: Target entries moved to the device; other entries are passed on as they are.
    DEVICE_KEYS: tuple[str, ...] = ("boxes", "labels", "masks", "sem_seg")

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
    ) -> None:
        def positive(name: str, value: Any, allow_zero: bool = False) -> None:
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                raise ValueError(f"Trainer {name} must be an int {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        positive("max_iter", max_iter)
        positive("checkpoint_period", checkpoint_period)
        positive("keep_checkpoints", keep_checkpoints)
        positive("eval_period", eval_period, allow_zero=True)
        positive("log_period", log_period)
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

        self.iter = 0
        self.start_iter = 0
        self.logger: MetricsLogger | None = None
        self._data_iter: Iterator[Any] | None = None
        self._in_step = False
        self._updating = False
        self._interrupt_requested = False
        self._prev_sigint: Any = None
        self._last_saved_iter = -1
        self._train_start = time.perf_counter()
        self._last_lr = float(optimizer.param_groups[0]["lr"])
        self._last_losses: dict[str, float] = {}
        self._grad_norm: Tensor | None = None
        self._reset_tracking()

    # ----------------------------------------------------------------------------------------------
    # Per-step state kept on the device
    # ----------------------------------------------------------------------------------------------

    def _reset_tracking(self) -> None:
        # Loss sums per key signature: {keys: [sum vector, steps]}. A model that returns the same
        # keys every step (the usual case) has one entry.
        self._acc: dict[tuple[str, ...], list[Any]] = {}
        self._iter_dev: Tensor | None = None
        self._bad_seen: Tensor | None = None
        self._bad: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}
        self._period_start = time.perf_counter()
        self._period_iters = 0
        self._period_images = 0
        self._period_data_time = 0.0

    def _reset_period(self) -> None:
        self._acc = {}
        self._period_start = time.perf_counter()
        self._period_iters = 0
        self._period_images = 0
        self._period_data_time = 0.0

    def _record(self, keys: tuple[str, ...], values: Tensor) -> None:
        """Accumulates detached loss values and tracks the first non-finite step, without syncing."""
        entry = self._acc.get(keys)
        if entry is None:
            self._acc[keys] = [values.clone(), 1]
        else:
            entry[0] += values
            entry[1] += 1
        assert self._iter_dev is not None and self._bad_seen is not None
        bad = ~torch.isfinite(values.sum())
        newly = bad & ~self._bad_seen
        prev_iter, prev_vals = self._bad.get(keys, (torch.zeros_like(self._iter_dev), torch.zeros_like(values)))
        self._bad[keys] = (torch.where(newly, self._iter_dev, prev_iter), torch.where(newly, values, prev_vals))
        self._bad_seen |= bad

    # ----------------------------------------------------------------------------------------------
    # One iteration
    # ----------------------------------------------------------------------------------------------

    def _to_device(self, images: Any, targets: Sequence[Mapping[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
        if isinstance(images, Tensor):
            images = images.to(self.device, non_blocking=True)
        else:
            images = [img.to(self.device, non_blocking=True) for img in images]
        moved = []
        for target in targets:
            moved.append({
                k: v.to(self.device, non_blocking=True) if k in self.DEVICE_KEYS and isinstance(v, Tensor) else v
                for k, v in target.items()
            })
        return images, moved

    def _next_batch(self) -> tuple[Any, list[dict[str, Any]]]:
        if self._data_iter is None:
            self._data_iter = iter(self.train_loader)
        t0 = time.perf_counter()
        batch = next(self._data_iter)
        self._period_data_time += time.perf_counter() - t0
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"the train loader must yield (images, targets) pairs, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        images, targets = batch
        n_images = len(images)
        if len(targets) != n_images:
            raise ValueError(f"a batch has {n_images} images but {len(targets)} targets")
        self._period_images += n_images * self.world_size
        return images, targets

    def run_step(self) -> dict[str, Tensor]:
        """Runs one training iteration: data, forward, backward, (clip), optimizer and scheduler steps.

        Returns:
            The detached loss terms of this step (on the device; reading them synchronises).
        """
        if self._iter_dev is None:
            self._iter_dev = torch.tensor(self.iter, dtype=torch.int64, device=self.device)
            self._bad_seen = torch.zeros((), dtype=torch.bool, device=self.device)
        images, targets = self._next_batch()
        images, targets = self._to_device(images, targets)
        with autocast(self.device, self.amp):
            loss_dict = _as_scalar_losses(self.model(images, targets))
        keys = tuple(loss_dict)
        # Losses are summed in float32 even under autocast: a bf16 sum of several terms loses digits.
        stacked = torch.stack([v.reshape(()).float() for v in loss_dict.values()])
        total = stacked.sum()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
        self._updating = True
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._last_lr = float(self.optimizer.param_groups[0]["lr"])
        if self.scaler.is_enabled():
            # A skipped first step (fp16 overflow) makes torch warn about the call order; expected.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_SCHEDULER_WARNING)
                self.scheduler.step()
        else:
            self.scheduler.step()
        self._updating = False
        self._iter_dev += 1
        values = stacked.detach()
        self._record(keys, values)
        self._period_iters += 1
        return dict(zip(keys, values.unbind(0)))

    # ----------------------------------------------------------------------------------------------
    # Checks shared by every process
    # ----------------------------------------------------------------------------------------------

    def _nonfinite_message(self, first_iter: int | None) -> str:
        local: tuple[int, dict[str, float]] | None = None
        if self._bad_seen is not None and bool(self._bad_seen):
            for keys, (it, vals) in self._bad.items():
                it_i = int(it)
                if it_i > 0:
                    local = (it_i, dict(zip(keys, vals.tolist())))
                    break
        first = first_iter if first_iter is not None else (local[0] if local else -1)
        if local is not None and local[0] == first:
            values = ", ".join(f"{k}={v}" for k, v in local[1].items())
            detail = f"loss values: {values}"
        else:
            detail = "the non-finite loss was on another process" + (
                f" (this one saw its first at iteration {local[0]})" if local else ""
            )
        last = self.checkpointer.latest()
        kept = f"the last good checkpoint is '{last}' in {self.output_dir}" if last else "no checkpoint was saved yet"
        return (
            f"non-finite loss at iteration {first}; {detail}. Training stopped on every process; {kept}. "
            "Common causes: a learning rate too high for the batch size (lower solver.lr or lengthen "
            "solver.warmup_iters), fp16 overflow (try train.amp=bf16), or degenerate boxes in the data."
        )

    def _raise_if_nonfinite(self) -> None:
        """Raises FloatingPointError on every process if any process saw a non-finite loss."""
        if self._bad_seen is None:
            return
        flag = self._bad_seen.to(torch.float32).reshape(1)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self._raise_nonfinite_collective()

    def _raise_nonfinite_collective(self) -> None:
        sentinel = 2**62
        local_first = sentinel
        if self._bad_seen is not None and bool(self._bad_seen):
            local_first = min([int(it) for it, _ in self._bad.values() if int(it) > 0] or [sentinel])
        first = torch.tensor([local_first], dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        raise FloatingPointError(self._nonfinite_message(int(first.item())))

    def _flush_log(self, time_up_local: bool) -> bool:
        """Reduces and logs the period's losses; returns whether any process hit the time limit.

        One collective carries the loss sums, the non-finite flag and the time-limit flag, so
        logging costs a single synchronisation per period.
        """
        local_sums: dict[str, Tensor] = {}
        local_counts: dict[str, int] = {}
        for keys, (vec, steps) in self._acc.items():
            for i, k in enumerate(keys):
                local_sums[k] = local_sums[k] + vec[i] if k in local_sums else vec[i]
                local_counts[k] = local_counts.get(k, 0) + steps
        if self.world_size > 1:
            all_keys = sorted({k for ks in all_gather_object(sorted(local_sums)) for k in ks})
        else:
            all_keys = sorted(local_sums)
        zero = torch.zeros((), device=self.device)
        bad = self._bad_seen.float() if self._bad_seen is not None else zero
        packed = torch.stack(
            [local_sums.get(k, zero) for k in all_keys]
            + [torch.tensor(float(local_counts.get(k, 0)), device=self.device) for k in all_keys]
            + [bad, torch.tensor(float(time_up_local), device=self.device)]
        )
        if self.world_size > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        values = packed.tolist()  # the one host-device synchronisation of the period
        n = len(all_keys)
        if values[2 * n] > 0:
            self._raise_nonfinite_collective()
        time_up = values[2 * n + 1] > 0
        losses = {k: values[i] / values[n + i] for i, k in enumerate(all_keys) if values[n + i] > 0}
        elapsed = time.perf_counter() - self._period_start
        iters = max(1, self._period_iters)
        extra: dict[str, float] = {}
        if self._grad_norm is not None:
            extra["grad_norm"] = float(self._grad_norm)
        if self.device.type == "cuda":
            extra["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.scaler.is_enabled():
            extra["loss_scale"] = float(self.scaler.get_scale())
        assert self.logger is not None
        if losses:
            self._last_losses = losses
            self.logger.log_train(
                self.iter,
                losses,
                lr=self._last_lr,
                images_per_sec=self._period_images / elapsed if elapsed > 0 else 0.0,
                time_s=time.perf_counter() - self._train_start,
                data_time=self._period_data_time / iters,
                eta_seconds=(self.max_iter - self.iter) * elapsed / iters,
                extra=extra,
            )
        self._reset_period()
        return time_up

    # ----------------------------------------------------------------------------------------------
    # Checkpoints and evaluation
    # ----------------------------------------------------------------------------------------------

    def _save(self, name: str, *, gather: bool = True) -> None:
        state = make_trainer_state(
            self.iter, self.optimizer, self.scheduler, self.scaler, self.train_loader, gather=gather,
            extra={"max_iter": self.max_iter},
        )
        path = self.checkpointer.save(name, self.model, state)
        self._last_saved_iter = self.iter
        if path is not None and self.logger is not None:
            self.logger.info(f"saved checkpoint {path.name} (iteration {self.iter})")

    def _evaluate(self) -> dict[str, Any]:
        if self.eval_fn is None:
            return {}
        model = unwrap_model(self.model)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            with preserve_rng_states(), torch.no_grad():
                results = self.eval_fn(model, self.iter)
        finally:
            model.train(was_training)
        if results is None:
            results = {}
        if not isinstance(results, Mapping):
            raise TypeError(f"eval_fn must return a dict of metrics, got {type(results).__name__}")
        assert self.logger is not None
        self.logger.log_eval(self.iter, results, time_s=time.perf_counter() - self._train_start)
        self.logger.info(f"evaluation took {time.perf_counter() - t0:.1f} s")
        # Evaluation time must not count against the training speed of the next period.
        self._period_start = time.perf_counter()
        return dict(results)

    # ----------------------------------------------------------------------------------------------
    # Interrupts
    # ----------------------------------------------------------------------------------------------

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._in_step and not self._interrupt_requested:
            # Finish the step so the checkpoint is an exact resume point; a second Ctrl-C goes
            # to the previous handler (normally: KeyboardInterrupt right away).
            # No logging here: writing to a file the interrupted code may be writing to is unsafe.
            self._interrupt_requested = True
            signal.signal(signal.SIGINT, self._prev_sigint)
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def _sigint_deferred(self) -> Iterator[None]:
        installed = False
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGINT)
            if prev not in (signal.SIG_IGN, None):
                self._prev_sigint = prev
                signal.signal(signal.SIGINT, self._on_sigint)
                installed = True
        try:
            yield
        finally:
            if installed:
                signal.signal(signal.SIGINT, self._prev_sigint)

    def _save_on_interrupt(self) -> None:
        if not is_main_process():
            return
        log = self.logger.info if self.logger is not None else print
        if self._updating:
            log(f"interrupted inside the optimizer update of iteration {self.iter + 1}: the weights are "
                f"half-updated, so no checkpoint is saved; the last one is {self.checkpointer.latest()}")
            return
        if self._bad_seen is not None and bool(self._bad_seen):
            log("interrupted after a non-finite loss: not saving the weights; "
                f"the last good checkpoint is {self.checkpointer.latest()}")
            return
        if self._last_saved_iter == self.iter and not self._in_step:
            log(f"interrupted at iteration {self.iter}, which is already saved ({self.checkpointer.latest()})")
            return
        if self._in_step:
            log(f"interrupted inside iteration {self.iter + 1}: saving the state after iteration {self.iter} "
                "(the batch of the unfinished iteration was consumed and is skipped on resume)")
        # Other processes may not reach a collective now: save this rank's loader/RNG state only.
        self._save(f"model_{self.iter:07d}", gather=False)
        log(f"interrupted at iteration {self.iter}; resume with train(resume=True) (tools: --resume)")

    # ----------------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------------

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Trains to ``max_iter`` (or the time limit), saving checkpoints and evaluating.

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
        self._train_start = time.perf_counter()
        self.start_iter = 0
        if resume:
            self.start_iter = self.checkpointer.resume(
                self.model, self.optimizer, self.scheduler, self.scaler, self.train_loader
            )
        self.iter = self.start_iter
        self._last_saved_iter = self.start_iter if resume and self.checkpointer.latest() else -1
        self._last_lr = float(self.optimizer.param_groups[0]["lr"])
        self._reset_tracking()
        self._data_iter = None
        self._interrupt_requested = False
        self.logger = MetricsLogger(
            self.output_dir, max_iter=self.max_iter, start_iter=self.start_iter,
            tensorboard=self.tensorboard, progress=self.progress,
        )
        if resume:
            latest = self.checkpointer.latest()
            self.logger.info(
                f"resumed from {latest} at iteration {self.start_iter}" if latest
                else f"no checkpoint in {self.output_dir}; starting from scratch"
            )
        self.logger.info(
            f"training iterations {self.start_iter + 1}..{self.max_iter} on {self.device} "
            f"({self.world_size} process{'es' if self.world_size > 1 else ''}, amp={self.amp})"
        )
        limit_s = self.max_time_minutes * 60.0 if self.max_time_minutes is not None else None
        stopped_early = False
        results: dict[str, Any] = {}
        self.model.train()
        try:
            with self._sigint_deferred():
                while self.iter < self.max_iter:
                    self._in_step = True
                    self.run_step()
                    self.iter += 1
                    self._in_step = False
                    self.logger.advance()
                    if self._interrupt_requested:
                        self.logger.info(f"Ctrl-C: stopping after iteration {self.iter}")
                        if self.world_size == 1 and self._period_iters > 0:
                            # Other processes may not join a collective now, so only alone.
                            self._flush_log(False)
                        raise KeyboardInterrupt
                    time_up_local = limit_s is not None and time.perf_counter() - self._train_start > limit_s
                    at_end = self.iter == self.max_iter
                    if self.world_size == 1:
                        time_up = time_up_local
                        if at_end or time_up or self.iter % self.log_period == 0:
                            self._flush_log(time_up)
                    else:
                        time_up = False
                        if at_end or self.iter % self.log_period == 0:
                            time_up = self._flush_log(time_up_local)
                    if at_end:
                        break
                    if time_up:
                        stopped_early = True
                        break
                    if self.iter % self.checkpoint_period == 0:
                        self._raise_if_nonfinite()
                        self._save(f"model_{self.iter:07d}")
                    if self.eval_period > 0 and self.iter % self.eval_period == 0:
                        self._raise_if_nonfinite()
                        self._evaluate()
                self._raise_if_nonfinite()
                if stopped_early:
                    self.logger.info(
                        f"stopping early at iteration {self.iter} of {self.max_iter}: the time limit of "
                        f"{self.max_time_minutes} minutes (train.max_time_minutes) was reached"
                    )
                    self._save(f"model_{self.iter:07d}")
                elif self.iter > self.start_iter:
                    self._save("model_final")
                else:
                    self.logger.info(f"training was already complete at iteration {self.iter}")
                results = self._evaluate()
                # When train() returns on any process, rank 0's final checkpoint is on disk.
                barrier()
        except KeyboardInterrupt:
            self._save_on_interrupt()
            self._close_logger()
            raise
        except FloatingPointError:
            self._close_logger()
            raise
        except Exception as exc:
            self._close_logger()
            # An error right after a NaN (e.g. NaN boxes in a later op) is reported as what it is.
            if self._nonfinite_seen_locally():
                raise FloatingPointError(self._nonfinite_message(None)) from exc
            raise
        finally:
            self._in_step = False
            # Drop the iterator so that the loader's worker processes can shut down.
            self._data_iter = None
        total = time.perf_counter() - self._train_start
        if stopped_early:
            self.logger.info(
                f"stopped early after {total / 60:.1f} min; resume with train(resume=True) (tools: --resume)"
            )
        else:
            self.logger.info(f"training finished: iteration {self.iter} in {total / 60:.1f} min")
        self._close_logger()
        return {
            "iteration": self.iter,
            "max_iter": self.max_iter,
            "stopped_early": stopped_early,
            "time_seconds": total,
            "losses": dict(self._last_losses),
            "eval": flatten_metrics(results),
        }

    def _nonfinite_seen_locally(self) -> bool:
        """Whether this process recorded a non-finite loss; False if the device cannot even say."""
        if self._bad_seen is None:
            return False
        try:
            return bool(self._bad_seen)
        except Exception:  # e.g. a CUDA error made the device unusable: keep the original error
            return False

    def _close_logger(self) -> None:
        if self.logger is not None:
            self.logger.close(plot=self.curves)


def build_trainer(
    cfg: Config,
    model: nn.Module,
    train_loader: Any,
    *,
    eval_fn: EvalFn | None = None,
    progress: bool = True,
) -> Trainer:
    """Builds the Trainer of a config: device, optimizer, schedule, DDP, precision, periods.

    Call :func:`~detection.engine.init_distributed` (before building the loader) and
    :func:`~detection.engine.seed_everything` (before building the model) first. This moves the
    model to the device (channels_last if ``train.channels_last``), builds the optimizer and the
    schedule, wraps the model in DDP when several processes run, and writes the resolved config to
    ``<output_dir>/config.yaml`` on the main process. ``train.compile`` is left to the model
    builder, which knows which parts compile well.

    Args:
        cfg: The experiment config.
        model: The (unwrapped) detector, on any device.
        train_loader: The endless training loader (see :class:`Trainer`).
        eval_fn: Evaluation callback (see :data:`EvalFn`).
        progress: Show a progress bar.

    Returns:
        The trainer; call ``train(resume=...)``.
    """
    world = get_world_size()
    if cfg.solver.ims_per_batch % world != 0:
        raise ValueError(
            f"solver.ims_per_batch={cfg.solver.ims_per_batch} is the global batch and must be divisible by "
            f"the number of processes ({world}); e.g. "
            f"solver.ims_per_batch={world * max(1, cfg.solver.ims_per_batch // world)}"
        )
    device = resolve_device(cfg.train.device)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.solver)
    scheduler = build_lr_scheduler(optimizer, cfg.solver)
    model = wrap_ddp(model, device)
    if is_main_process():
        dump_config(cfg, Path(cfg.train.output_dir) / "config.yaml")
    return Trainer(
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
    )

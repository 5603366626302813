"""The training loop: a small loop with hooks (:class:`TrainerBase`) and the detector's step (:class:`Trainer`).

``TrainerBase.train()`` is ``before_train``; for each iteration ``before_step``, ``run_step``,
``after_step``; ``after_train``. ``Trainer.run_step()`` is only the step: data, forward under
autocast, backward, clipping, optimizer and LR-schedule steps, and the on-device recording of the
loss values. Everything periodic or exceptional is a hook (:mod:`.hooks`, where their order is
explained): Ctrl-C, time limit, metrics logging, the non-finite guard, checkpoints, evaluation.

What a hook sees is the loop's :class:`~.state.TrainingState` (``trainer.state``: the iteration, the model,
the optimizer, the scaler, the loss records, the stop flag, ...) and :class:`TrainerBase`'s services
(``request_stop``, ``save_checkpoint``); never a :class:`Trainer` internal. :class:`Trainer` takes built
parts (``build_trainer`` builds them from a config) and builds its hooks in :meth:`Trainer.build_hooks`, which
a subclass overrides to add, drop or replace one.

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
  stop is requested locally and agreed through the logging all-reduce (:meth:`TrainerBase.request_stop`).
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
import dataclasses
import logging
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import torch
from torch import Tensor, nn

from resnet_det_common import (
    AMP_DTYPES,
    autocast,
    barrier,
    check_autocast,
    get_rank,
    get_world_size,
    logging_scope,
    resolve_device,
    wrap_ddp,
)

from ..config import Config
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
from .state import LossRecorder, TrainingState

__all__ = ["AMP_DTYPES", "EvalFn", "LossRecorder", "ModelEma", "Trainer", "TrainerBase", "TrainerOptions",
           "TrainingState", "build_grad_scaler", "build_trainer", "check_global_batch", "check_sync_batchnorm"]

_log = logging.getLogger(__name__)

_SCHEDULER_WARNING = r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"

_T = TypeVar("_T")


class _InState(Generic[_T]):
    """A trainer attribute that is the field of the same name of its ``state`` (read and written through either):
    ``trainer.iter`` is ``trainer.state.iter``, one value in one place."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _InState[_T]: ...

    @overload
    def __get__(self, obj: TrainerBase, owner: type | None = None) -> _T: ...

    def __get__(self, obj: TrainerBase | None, owner: type | None = None) -> _InState[_T] | _T:
        return self if obj is None else getattr(obj.state, self.name)

    def __set__(self, obj: TrainerBase, value: _T) -> None:
        setattr(obj.state, self.name, value)


class TrainerBase:
    """A loop with hooks: ``before_train``; per iteration ``before_step``, ``run_step``, ``after_step``;
    ``after_train``.

    The loop keeps its position in ``state`` (:class:`~.state.TrainingState`), which is all a hook reads:
    ``state.iter`` counts completed iterations (during ``run_step`` iteration ``iter + 1`` runs, and
    ``after_step`` sees it counted). The loop ends at ``state.max_iter`` or when ``state.stop_reason`` is set.
    A subclass implements ``run_step`` and fills the state fields its hooks read (the model, the optimizer,
    the loss records, ...); :meth:`save_checkpoint` when it has checkpoints.

    Args:
        state: The state to train with; default: a new one.

    Attributes:
        state: The training state shared with the hooks.
        iter / start_iter / max_iter / in_step / stop_reason / exception: The state's fields of those names.
    """

    iter = _InState[int]()
    start_iter = _InState[int]()
    max_iter = _InState[int]()
    in_step = _InState[bool]()
    stop_reason = _InState["str | None"]()
    exception = _InState["BaseException | None"]()

    def __init__(self, state: TrainingState | None = None) -> None:
        self._hooks: list[HookBase] = []
        self.state = state if state is not None else TrainingState()

    @property
    def hooks(self) -> tuple[HookBase, ...]:
        """The registered hooks, in the order they run."""
        return tuple(self._hooks)

    @property
    def finishing(self) -> bool:
        """True after the loop's last iteration: the hooks' final work is then done in ``after_train``."""
        return self.state.finishing

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
        s = self.state
        s.exception = None
        s.stop_reason = None
        s.start_iter = s.iter
        s.train_start = time.perf_counter()
        try:
            self.before_train()
            while s.iter < s.max_iter and s.stop_reason is None:
                self.before_step()
                s.in_step = True
                self.run_step()
                s.iter += 1
                s.in_step = False
                self.after_step()
        except BaseException as exc:
            s.exception = exc
            raise
        finally:
            self.after_train()
            s.in_step = False

    def run_step(self) -> Any:
        """One iteration; subclasses implement it."""
        raise NotImplementedError

    # -- services for the hooks ---------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stops the loop after this iteration, cleanly (the hooks' final work: checkpoint, evaluation).

        With one process at once (``state.stop_reason``). With several, the request is a vote
        (``state.stop_vote``) carried by the next logging all-reduce (:class:`~.hooks.MetricsWriter`), so that
        every process stops at the same iteration.
        """
        s = self.state
        if s.world_size == 1:
            s.stop_reason = reason
        elif s.stop_vote is None:
            s.stop_vote = reason

    def save_checkpoint(self, name: str, *, gather: bool = True) -> None:
        """Saves the state to resume from as checkpoint ``name`` (what :class:`~.hooks.PeriodicCheckpointer` and
        :class:`~.hooks.InterruptHook` call); a loop with checkpoints implements it, and sets
        ``state.last_saved_iter``. ``gather``: collect every process's part (a collective) or this one's only."""
        raise NotImplementedError(
            f"{type(self).__name__} does not save checkpoints: implement save_checkpoint(name, *, gather) (see "
            "Trainer.save_checkpoint), or leave PeriodicCheckpointer out of its hooks"
        )

    # -- the hook calls -----------------------------------------------------------------------------

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
        error in ``state.exception``); the first error is raised at the end."""
        error: BaseException | None = None
        for hook in self._hooks:
            try:
                hook.after_train()
            except BaseException as exc:
                error = error or exc
                self.state.exception = exc
        if error is not None:
            raise error


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




def _check_int(owner: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{owner} {name} must be an int {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """What a :class:`Trainer` does around its step: the periods of its default hooks
    (:meth:`Trainer.build_hooks`), the evaluation, the time limit and the run's outputs.

    Attributes:
        log_period: Log averaged losses every this many iterations (:class:`~.hooks.MetricsWriter`).
        checkpoint_period: Save ``model_<iteration>`` every this many iterations; ``model_final`` is always
            saved at the end (:class:`~.hooks.PeriodicCheckpointer`).
        eval_fn: ``eval_fn(model, iteration) -> metrics``: called on every process with the unwrapped model in
            eval mode; returns (possibly nested) metrics on the main process ({} elsewhere is fine). None: no
            evaluation (:class:`~.hooks.EvalHook`).
        eval_period: Evaluate every this many iterations (0 = only at the end).
        eval_with_ema: Evaluate the EMA weights instead of the trained ones (``test.use_ema``).
        max_time_minutes: Stop cleanly (checkpoint, evaluate) after this long; None = no limit. Checked every
            iteration with one process, every ``log_period`` iterations with several (the processes must agree
            on when to stop) (:class:`~.hooks.TimeLimit`).
        tensorboard: Also write TensorBoard events.
        progress: Show a progress bar on the main process (only when stderr is a terminal; the periodic log
            lines are the progress otherwise).
        curves: Draw ``curves.png`` when training ends.
    """

    log_period: int = 20
    checkpoint_period: int = 5000
    eval_fn: EvalFn | None = None
    eval_period: int = 0
    eval_with_ema: bool = False
    max_time_minutes: float | None = None
    tensorboard: bool = False
    progress: bool = True
    curves: bool = True

    def __post_init__(self) -> None:
        _check_int("TrainerOptions", "log_period", self.log_period)
        _check_int("TrainerOptions", "checkpoint_period", self.checkpoint_period)
        _check_int("TrainerOptions", "eval_period", self.eval_period, allow_zero=True)
        if self.max_time_minutes is not None and not self.max_time_minutes > 0:
            raise ValueError(f"TrainerOptions max_time_minutes must be > 0 or None, got {self.max_time_minutes!r}")
        if self.eval_fn is not None and not callable(self.eval_fn):
            raise TypeError(f"TrainerOptions eval_fn must be callable(model, iteration), got "
                            f"{type(self.eval_fn).__name__}")


def build_grad_scaler(device: torch.device | str, amp: str) -> torch.amp.GradScaler:
    """The gradient scaler of a precision: enabled for ``amp="fp16"`` only.

    Raises:
        ValueError: fp16 on a device whose torch has no gradient scaler.
    """
    device = torch.device(device)
    try:
        return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"a gradient scaler (train.amp=fp16) is not available on {device.type} with torch "
            f"{torch.__version__}: {err}; use train.amp=bf16 or off"
        ) from err


class Trainer(TrainerBase):
    """Trains a detector (torchvision convention) with checkpoints, resume and evaluation.

    It takes built parts (the model, its optimizer and schedule, the loader, and optionally the checkpointer,
    the gradient scaler and the weights' EMA), the step's options (precision, clipping, accumulation) and
    :class:`TrainerOptions` for everything around the step. Its hooks come from :meth:`build_hooks`, called
    at the end of ``__init__``: override it to add, drop or replace one; :meth:`register_hooks` appends more
    (they run after those).

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
        checkpointer: The run's checkpointer, on ``output_dir``; default: ``Checkpointer(output_dir)`` (3
            periodic checkpoints kept).
        scaler: The gradient scaler; default: :func:`build_grad_scaler` (enabled for ``amp="fp16"``).
        ema: An EMA of the weights (:class:`~.ema.ModelEma`), updated after every optimizer step and
            stored in the checkpoints; ``model_final_ema.safetensors`` holds it at the end.
        amp: ``"bf16"``, ``"fp16"`` (with a gradient scaler) or ``"off"``.
        clip_grad_norm: Clip the global gradient norm (after unscaling); None disables.
        accumulate: Gradient accumulation: an iteration is ``accumulate`` forward/backward passes over
            consecutive loader batches (each loss divided by ``accumulate``: the gradient of the mean over
            all of them), then one optimizer step. Iterations, the LR schedule, logging and checkpoints count
            optimizer steps; under DDP the inner passes skip the gradient all-reduce (``no_sync``).
        options: Periods, evaluation, time limit, outputs (:class:`TrainerOptions`); default: its defaults.

    Attributes:
        state: What the hooks see (:class:`~.state.TrainingState`); ``model``, ``optimizer``, ``scaler``,
            ``ema``, ``checkpointer``, ``device``, ``output_dir``, ``world_size``, ``grad_norm`` are its fields of
            those names.
        options: The :class:`TrainerOptions`.
    """

    model = _InState[nn.Module]()
    optimizer = _InState[torch.optim.Optimizer]()
    scaler = _InState[torch.amp.GradScaler]()
    ema = _InState["ModelEma | None"]()
    checkpointer = _InState[Checkpointer]()
    device = _InState[torch.device]()
    output_dir = _InState[Path]()
    world_size = _InState[int]()
    grad_norm = _InState["Tensor | None"]()

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
        checkpointer: Checkpointer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        ema: ModelEma | None = None,
        amp: str = "off",
        clip_grad_norm: float | None = None,
        accumulate: int = 1,
        options: TrainerOptions | None = None,
    ) -> None:
        options = TrainerOptions() if options is None else options
        if not isinstance(options, TrainerOptions):
            raise TypeError(f"Trainer options must be a TrainerOptions, got {type(options).__name__}")
        _check_int("Trainer", "max_iter", max_iter)
        _check_int("Trainer", "accumulate", accumulate)
        if amp not in AMP_DTYPES:
            raise ValueError(f"Trainer amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"Trainer clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        if ema is not None and not isinstance(ema, ModelEma):
            raise TypeError(f"Trainer ema must be a resnet_det.engine.ModelEma or None, got {type(ema).__name__}")
        if options.eval_with_ema and ema is None:
            raise ValueError("Trainer eval_with_ema=True needs an EMA (train.ema: {decay: ...}); test.use_ema=true "
                             "without train.ema has no averaged weights to evaluate")
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(train_loader, method, None)):
                raise TypeError(
                    f"the train loader ({type(train_loader).__name__}) needs {method}() so that a resumed "
                    "run continues the same data order"
                )
        device = torch.device(device)
        check_autocast(device, amp)
        output_dir = Path(output_dir)
        if checkpointer is None:
            checkpointer = Checkpointer(output_dir)
        elif checkpointer.output_dir.resolve() != output_dir.resolve():
            raise ValueError(f"the Trainer's checkpointer writes to {checkpointer.output_dir}, its output_dir is "
                             f"{output_dir}: give both the same folder (the run's checkpoints and logs go together)")
        super().__init__(TrainingState(
            max_iter=max_iter, world_size=get_world_size(), device=device, output_dir=output_dir, model=model,
            optimizer=optimizer, scaler=build_grad_scaler(device, amp) if scaler is None else scaler, ema=ema,
            checkpointer=checkpointer, recorder=LossRecorder(device),
            last_lr=float(optimizer.param_groups[0]["lr"]),
        ))
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.amp = amp
        self.clip_grad_norm = clip_grad_norm
        self.accumulate = accumulate
        self.options = options
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._data_iter: Iterator[Any] | None = None
        self.register_hooks(self.build_hooks())

    def build_hooks(self) -> list[HookBase]:
        """The trainer's hooks, in the order they run (:mod:`.hooks` says why this order): Ctrl-C, the time
        limit (with ``options.max_time_minutes``), metrics logging, the non-finite guard, checkpoints, the
        evaluation (with ``options.eval_fn``).

        Called once, at the end of ``__init__`` (a subclass sets what its own hooks need before calling
        ``super().__init__``). Override it to add, drop or replace a hook::

            class MyTrainer(Trainer):
                def build_hooks(self):
                    return [*super().build_hooks(), MyHook()]

        A hook reads ``self.trainer.state`` (:class:`~.state.TrainingState`) only, and calls
        ``request_stop`` / ``save_checkpoint``: see :class:`~.hooks.HookBase`.
        """
        o = self.options
        return [
            InterruptHook(),
            *([TimeLimit(o.max_time_minutes)] if o.max_time_minutes is not None else []),
            MetricsWriter(o.log_period),
            NonFiniteGuard(write_periods=(o.checkpoint_period, o.eval_period if o.eval_fn is not None else 0)),
            PeriodicCheckpointer(o.checkpoint_period),
            *([EvalHook(o.eval_fn, o.eval_period, use_ema=o.eval_with_ema)] if o.eval_fn is not None else []),
        ]

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
        self.state.updating = True
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self._scheduler_step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.state.updating = False
        values = losses.detach()
        self.state.recorder.record(keys, values, iteration=self.iter + 1)
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
        self.state.recorder.period_data_time += time.perf_counter() - t0
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"the train loader must yield (images, targets) pairs, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        images, targets = batch
        if len(targets) != len(images):
            raise ValueError(f"a batch has {len(images)} images but {len(targets)} targets")
        self.state.recorder.period_images += len(images) * self.world_size
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
    # Checkpoints and training
    # ----------------------------------------------------------------------------------------------

    def save_checkpoint(self, name: str, *, gather: bool = True) -> None:
        """Saves the weights and the trainer state as ``name`` (rank 0 writes; ``gather`` collects
        every rank's loader/RNG state and is then a collective)."""
        s = self.state
        extra: dict[str, Any] = {"max_iter": s.max_iter}
        if self.accumulate > 1:
            extra["accumulate"] = self.accumulate
        if s.ema is not None:
            extra["ema"] = s.ema.state_dict()
        trainer_state = make_trainer_state(
            s.iter, self.optimizer, self.scheduler, self.scaler, self.train_loader, gather=gather, extra=extra,
        )
        path = self.checkpointer.save(name, self.model, trainer_state)
        if path is not None and s.ema is not None and name == "model_final":
            ema_path = self.checkpointer.export_weights(f"{name}_ema", s.ema.weights(), iteration=s.iter)
            _log.info("saved the EMA weights %s (iteration %d)", ema_path.name, s.iter)
        s.last_saved_iter = s.iter
        if path is not None:
            _log.info("saved checkpoint %s (iteration %d)", path.name, s.iter)

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
        s = self.state
        o = self.options
        with logging_scope(self.output_dir, rank=get_rank()):
            start = time.perf_counter()
            s.iter = 0
            if resume:
                s.iter = self.checkpointer.resume(
                    self.model, self.optimizer, self.scheduler, self.scaler, self.train_loader, ema=s.ema
                )
            latest = self.checkpointer.resumed_from if resume else None
            s.last_saved_iter = s.iter if latest else -1
            s.last_lr = float(self.optimizer.param_groups[0]["lr"])
            s.recorder = LossRecorder(s.device)
            s.stop_vote = None
            s.eval_results = {}
            self._data_iter = None
            if resume:
                _log.info(f"resumed from {latest} at iteration {s.iter}" if latest
                          else f"no checkpoint in {self.output_dir}; starting from scratch")
            _log.info("training iterations %d..%d on %s (%d process%s, amp=%s)", s.iter + 1, s.max_iter,
                      s.device, s.world_size, "es" if s.world_size > 1 else "", self.amp)
            s.metrics_logger = MetricsLogger(self.output_dir, max_iter=s.max_iter, start_iter=s.iter,
                                             tensorboard=o.tensorboard, progress=o.progress)
            self.model.train()
            try:
                super().train()
                barrier()  # when train() returns on any process, rank 0's final checkpoint is on disk
            except BaseException:
                self._data_iter = None  # lets the loader's worker processes shut down
                s.metrics_logger.close(plot=o.curves)  # a write error now is a warning: the first error wins
                raise
            self._data_iter = None
            s.metrics_logger.close(plot=o.curves, strict=True)  # curves.png on a full disk fails the run
            total = time.perf_counter() - start
            stopped_early = s.stop_reason is not None
            if stopped_early:
                _log.info("stopped early after %.1f min; resume with train(resume=True) (tools: --resume)", total / 60)
            else:
                _log.info("training finished: iteration %d in %.1f min", s.iter, total / 60)
        return {
            "iteration": s.iter,
            "max_iter": s.max_iter,
            "stopped_early": stopped_early,
            "time_seconds": total,
            "losses": dict(s.last_losses),
            "eval": flatten_metrics(s.eval_results),
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
    trainer_class: type[Trainer] | None = None,
) -> Trainer:
    """Builds the Trainer of a config and its parts: device, optimizer, schedule, checkpointer, gradient scaler,
    EMA, DDP, the options.

    Call :func:`~resnet_det_common.init_distributed` (before building the loader) and
    :func:`~resnet_det_common.seed_everything` (before building the model) first. This moves the
    model to the device (channels_last if ``train.channels_last``), builds the optimizer and the
    schedule, the weights' EMA (``train.ema``), and wraps the model in DDP when several processes run.
    Beyond the trainer's own hooks (:meth:`Trainer.build_hooks`), registers :class:`~.hooks.LossGrowthWarning`
    (a loss grown by orders of magnitude is reported with its iteration). ``train.compile`` is left to the
    model builder, which knows which parts compile well; the run's ``config.yaml`` to the launch
    (:func:`~.launch.write_run_config`).

    Args:
        cfg: The experiment config.
        model: The (unwrapped) detector, on any device.
        train_loader: The endless training loader (see :class:`Trainer`); with ``solver.accumulate`` k,
            its batches hold ``solver.ims_per_batch / k`` images over all processes.
        eval_fn: Evaluation callback (see :class:`TrainerOptions`).
        progress: Show a progress bar.
        trainer_class: A :class:`Trainer` subclass to build (e.g. one whose ``build_hooks`` adds a hook);
            default: :class:`Trainer`.

    Returns:
        The trainer; call ``train(resume=...)``.
    """
    trainer_class = Trainer if trainer_class is None else trainer_class
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"build_trainer trainer_class must be a Trainer subclass, got {trainer_class!r}")
    check_global_batch(cfg, get_world_size())
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
    output_dir = Path(cfg.train.output_dir)
    trainer = trainer_class(
        model,
        optimizer,
        scheduler,
        train_loader,
        device=device,
        max_iter=cfg.solver.max_iter,
        output_dir=output_dir,
        checkpointer=Checkpointer(output_dir, keep=cfg.train.keep_checkpoints),
        scaler=build_grad_scaler(device, cfg.train.amp),
        ema=ema,
        amp=cfg.train.amp,
        clip_grad_norm=cfg.solver.clip_grad_norm,
        accumulate=cfg.solver.accumulate,
        options=TrainerOptions(
            log_period=cfg.train.log_period,
            checkpoint_period=cfg.train.checkpoint_period,
            eval_fn=eval_fn,
            eval_period=cfg.train.eval_period,
            eval_with_ema=cfg.test.use_ema,
            max_time_minutes=cfg.train.max_time_minutes,
            tensorboard=cfg.train.tensorboard,
            progress=progress,
        ),
    )
    # After the standard hooks: it reads the losses MetricsWriter logged at the same iteration.
    trainer.register_hooks([LossGrowthWarning()])
    return trainer

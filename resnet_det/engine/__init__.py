"""Training engine: the loop with hooks, checkpoints, solver, metrics logging (process-group, RNG and logging
helpers: resnet_det_common)."""

from .checkpoint import (
    POINTER_FILE,
    STATE_SUFFIX,
    WEIGHTS_SUFFIX,
    Checkpointer,
    CheckpointError,
    load_model_weights,
    make_trainer_state,
)
from .ema import ModelEma
from .hooks import (
    EvalHook,
    HookBase,
    InterruptHook,
    LossGrowthWarning,
    MetricsWriter,
    NonFiniteGuard,
    PeriodicCheckpointer,
    TimeLimit,
)
from .logger import MetricsLogger, flatten_metrics, plot_curves, read_metrics
from .solver import WarmupLR, build_lr_scheduler, build_optimizer, lr_multiplier
from .state import LossRecorder, TrainingState
from .trainer import AMP_DTYPES, EvalFn, Trainer, TrainerBase, TrainerOptions, build_grad_scaler, build_trainer

__all__ = [
    "AMP_DTYPES",
    "POINTER_FILE",
    "STATE_SUFFIX",
    "WEIGHTS_SUFFIX",
    "CheckpointError",
    "Checkpointer",
    "EvalFn",
    "EvalHook",
    "HookBase",
    "InterruptHook",
    "LossGrowthWarning",
    "LossRecorder",
    "MetricsLogger",
    "MetricsWriter",
    "ModelEma",
    "NonFiniteGuard",
    "PeriodicCheckpointer",
    "TimeLimit",
    "Trainer",
    "TrainerBase",
    "TrainerOptions",
    "TrainingState",
    "WarmupLR",
    "build_grad_scaler",
    "build_lr_scheduler",
    "build_optimizer",
    "build_trainer",
    "flatten_metrics",
    "load_model_weights",
    "lr_multiplier",
    "make_trainer_state",
    "plot_curves",
    "read_metrics",
]

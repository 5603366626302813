"""Training engine: trainer, checkpoints, solver, distributed helpers, metrics logging."""

from .checkpoint import (
    POINTER_FILE,
    STATE_SUFFIX,
    WEIGHTS_SUFFIX,
    Checkpointer,
    CheckpointError,
    load_model_weights,
    make_trainer_state,
)
from .distributed import (
    all_gather_object,
    all_reduce_dict,
    barrier,
    cleanup,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    resolve_device,
    unwrap_model,
    wrap_ddp,
)
from .logger import MetricsLogger, flatten_metrics, plot_curves, read_metrics
from .rng import get_rng_states, preserve_rng_states, seed_everything, set_rng_states
from .solver import WarmupLR, build_lr_scheduler, build_optimizer, lr_multiplier
from .trainer import AMP_DTYPES, EvalFn, Trainer, build_trainer

__all__ = [
    "AMP_DTYPES",
    "POINTER_FILE",
    "STATE_SUFFIX",
    "WEIGHTS_SUFFIX",
    "CheckpointError",
    "Checkpointer",
    "EvalFn",
    "MetricsLogger",
    "Trainer",
    "WarmupLR",
    "all_gather_object",
    "all_reduce_dict",
    "barrier",
    "build_lr_scheduler",
    "build_optimizer",
    "build_trainer",
    "cleanup",
    "flatten_metrics",
    "get_local_rank",
    "get_rank",
    "get_rng_states",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "load_model_weights",
    "lr_multiplier",
    "make_trainer_state",
    "plot_curves",
    "preserve_rng_states",
    "read_metrics",
    "resolve_device",
    "seed_everything",
    "set_rng_states",
    "unwrap_model",
    "wrap_ddp",
]

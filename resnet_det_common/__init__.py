"""The bottom layer: helpers every package uses, importing nothing else of this project.

- :mod:`.amp`: one autocast helper (``autocast(device, "bf16" | "fp16" | "off")``) and its checks;
- :mod:`.io`: one atomic file writer (temporary file, fsync, rename);
- :mod:`.dist`: process-group helpers that are no-ops without ``torch.distributed``;
- :mod:`.rng`: seeding and RNG states as plain containers (``torch.load(weights_only=True)``-safe);
- :mod:`.checks`: the ``ValueError`` helper of the typed specs and configs;
- :mod:`.logs`: the one logging setup (console + rank-0 ``log.txt``), progress bars that keep out of files.
"""

from typing import TYPE_CHECKING

from .lazy import lazy_exports

if TYPE_CHECKING:  # the names, for type checkers; at run time they are imported on first use
    from .amp import AMP_DTYPES, autocast, check_autocast
    from .checks import check
    from .dist import (
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
    from .io import TMP_MARK, OutputWriteError, atomic_write, fsync_dir, temp_file_owner, writing
    from .logs import (
        LOG_FILENAME,
        PROJECT_LOGGERS,
        log_report,
        logging_scope,
        progress_bar,
        raise_log_write_failure,
        setup_logger,
        stderr_is_terminal,
    )
    from .rng import get_rng_states, preserve_rng_states, seed_everything, set_rng_states

__all__ = [
    "AMP_DTYPES",
    "LOG_FILENAME",
    "PROJECT_LOGGERS",
    "TMP_MARK",
    "OutputWriteError",
    "all_gather_object",
    "all_reduce_dict",
    "atomic_write",
    "autocast",
    "barrier",
    "check",
    "check_autocast",
    "cleanup",
    "fsync_dir",
    "get_local_rank",
    "get_rank",
    "get_rng_states",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "log_report",
    "logging_scope",
    "preserve_rng_states",
    "progress_bar",
    "raise_log_write_failure",
    "resolve_device",
    "seed_everything",
    "set_rng_states",
    "setup_logger",
    "stderr_is_terminal",
    "temp_file_owner",
    "unwrap_model",
    "wrap_ddp",
    "writing",
]

# Lazy (resnet_det_common.lazy): importing this package loads none of its submodules until a name is used.
__getattr__, __dir__ = lazy_exports(__name__, {
    "AMP_DTYPES": ".amp",
    "autocast": ".amp",
    "check_autocast": ".amp",
    "check": ".checks",
    "all_gather_object": ".dist",
    "all_reduce_dict": ".dist",
    "barrier": ".dist",
    "cleanup": ".dist",
    "get_local_rank": ".dist",
    "get_rank": ".dist",
    "get_world_size": ".dist",
    "init_distributed": ".dist",
    "is_distributed": ".dist",
    "is_main_process": ".dist",
    "resolve_device": ".dist",
    "unwrap_model": ".dist",
    "wrap_ddp": ".dist",
    "TMP_MARK": ".io",
    "OutputWriteError": ".io",
    "writing": ".io",
    "atomic_write": ".io",
    "fsync_dir": ".io",
    "temp_file_owner": ".io",
    "LOG_FILENAME": ".logs",
    "PROJECT_LOGGERS": ".logs",
    "log_report": ".logs",
    "logging_scope": ".logs",
    "progress_bar": ".logs",
    "raise_log_write_failure": ".logs",
    "setup_logger": ".logs",
    "stderr_is_terminal": ".logs",
    "get_rng_states": ".rng",
    "preserve_rng_states": ".rng",
    "seed_everything": ".rng",
    "set_rng_states": ".rng",
})

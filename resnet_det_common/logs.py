"""One logging path: console and the run's ``log.txt`` get the same records, and progress bars keep out of files.

Every module of this project logs through ``logging.getLogger(__name__)``; nothing prints. One call,
:func:`setup_logger`, sends the records of the project's loggers (``backbone``, ``detection``,
``segmentation``, ``resnet_det``) to the console (stderr) and, on the main process, to
``<output_dir>/log.txt``, with the same format. Other processes log warnings only, to the console.

- Idempotent: calling it again adds no second console handler and no second handler for the same
  file (a second folder gets its own file handler: both files then receive the records).
- A script that already set up console logging (``logging.basicConfig``) keeps it: no second
  console handler is added, the records reach the script's handler by propagation.
- :func:`logging_scope` is the same setup undone on exit: what a library call such as
  ``Trainer.train()`` uses, so it neither depends on nor leaves behind a global configuration.
- :func:`progress_bar` shows a tqdm bar only when stderr is a terminal and, while it lives, writes the
  console records through tqdm (``logging_redirect_tqdm``) so that log lines do not break the bar.
  Redirected to a file, there is no bar at all (no ``\\r`` redraws, no escape codes): the periodic log
  lines are the progress.
- :func:`log_report` is how tables (the COCO and mean-IoU tables) are emitted: logged at INFO, or
  printed to stdout when INFO logging is off (nothing set up: a notebook, a bare script), so that a
  table is never silently lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .io import OutputWriteError

__all__ = [
    "LOG_FILENAME",
    "PROJECT_LOGGERS",
    "log_report",
    "logging_scope",
    "progress_bar",
    "raise_log_write_failure",
    "setup_logger",
    "stderr_is_terminal",
]

LOG_FILENAME = "log.txt"
PROJECT_LOGGERS: tuple[str, ...] = ("resnet_det_common", "backbone", "detection", "segmentation", "resnet_det")
"""The top-level loggers of this project's packages (every module logs under one of them)."""

_TAG = "_resnet_det_handler"  # marks the handlers setup_logger made: ("console",) or ("file", path)
_FORMAT = "[%(asctime)s %(name)s] %(message)s"
_DATEFMT = "%m/%d %H:%M:%S"


class _Formatter(logging.Formatter):
    """``[time logger] message``; warnings and errors say so in front of the message."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        if record.levelno >= logging.WARNING:
            head, sep, message = text.partition("] ")
            return f"{head}{sep}{record.levelname}: {message}"
        return text


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is *now* (as ``logging.lastResort`` does), not to the stream
    of the moment it was made: pytest, notebooks and ``contextlib.redirect_stderr`` swap it."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


class _LogFileHandler(logging.FileHandler):
    """``log.txt``: a write that fails (a full disk) is kept as :attr:`failure`, not printed as logging's
    "--- Logging error ---" traceback, and nothing more is written to the file. The run then stops with one
    line naming the file (:func:`raise_log_write_failure`, called by the trainer every logging period and when
    a :func:`logging_scope` ends)."""

    failure: OutputWriteError | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.failure is None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            super().handleError(record)
            return
        self.failure = OutputWriteError("log file", self.baseFilename, err)
        with contextlib.suppress(OSError, ValueError):
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the buffered rest of a failed write fails again: it is known
            super().close()


def raise_log_write_failure(name: str | Sequence[str] = PROJECT_LOGGERS) -> None:
    """Raises the :class:`~resnet_det_common.io.OutputWriteError` of a ``log.txt`` write that failed, if any.

    Raises:
        OutputWriteError: A ``log.txt`` of the project's loggers could not be written (a full disk).
    """
    for logger in (logging.getLogger(n) for n in _names(name)):
        for handler in logger.handlers:
            if isinstance(handler, _LogFileHandler) and handler.failure is not None:
                raise handler.failure


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal (what ``logging_redirect_tqdm`` redirects)."""
    if not isinstance(handler, logging.StreamHandler):
        return False
    stream = handler.stream
    return stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def _names(name: str | Sequence[str]) -> tuple[str, ...]:
    names = (name,) if isinstance(name, str) else tuple(name)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"setup_logger name must be a logger name or a list of them, got {name!r}")
    return names


def _tagged(loggers: Sequence[logging.Logger], tag: tuple[str, ...]) -> logging.Handler | None:
    for logger in loggers:
        for handler in logger.handlers:
            if getattr(handler, _TAG, None) == tag:
                return handler
    return None


def setup_logger(
    output_dir: str | os.PathLike[str] | None = None,
    *,
    rank: int | None = None,
    name: str | Sequence[str] = PROJECT_LOGGERS,
    level: int = logging.INFO,
) -> logging.Logger:
    """Sends the project's log records to the console and (main process) to ``<output_dir>/log.txt``.

    Example::

        setup_logger("output/run1")          # console + output/run1/log.txt, same records
        logging.getLogger("detection.x").info("reaches both")

    Args:
        output_dir: The run's folder (created if needed); None: console only.
        rank: This process's rank; default: the process group's (0 without one). Rank 0 logs at
            ``level`` to the console and the file; other ranks log warnings and errors to the console.
        name: The logger(s) to configure; default: the project's top-level loggers.
        level: The main process's level.

    Returns:
        The (first) configured logger.
    """
    names = _names(name)
    loggers = [logging.getLogger(n) for n in names]
    if rank is None:
        from .dist import get_rank  # here: torch.distributed is imported only when the rank is not given

        rank = get_rank()
    main = rank == 0
    wanted = level if main else max(level, logging.WARNING)
    for logger in loggers:
        # Only ever raise the verbosity: a level the application set lower (DEBUG) stays.
        if logger.level == logging.NOTSET or logger.level > wanted:
            logger.setLevel(wanted)

    root_has_console = any(_is_console(h) for h in logging.getLogger().handlers)
    if not root_has_console:
        console = _tagged(loggers, ("console",))
        if console is None:
            console = _ConsoleHandler()
            console.setFormatter(_Formatter(_FORMAT, _DATEFMT))
            setattr(console, _TAG, ("console",))
        for logger in loggers:
            if console not in logger.handlers:
                logger.addHandler(console)

    if output_dir is not None and main:
        path = (Path(output_dir) / LOG_FILENAME).resolve()
        tag = ("file", str(path))
        file_handler = _tagged(loggers, tag)
        if file_handler is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            file_handler = _LogFileHandler(path, mode="a", encoding="utf-8")
            file_handler.setFormatter(_Formatter(_FORMAT, _DATEFMT))
            setattr(file_handler, _TAG, tag)
        for logger in loggers:
            if file_handler not in logger.handlers:
                logger.addHandler(file_handler)
    return loggers[0]


@contextlib.contextmanager
def logging_scope(
    output_dir: str | os.PathLike[str] | None = None,
    *,
    rank: int | None = None,
    name: str | Sequence[str] = PROJECT_LOGGERS,
) -> Iterator[logging.Logger]:
    """:func:`setup_logger` for the duration of a ``with`` block; what it added is removed after.

    A setup that was already there (the same folder, a console handler) is left as it was.
    """
    loggers = [logging.getLogger(n) for n in _names(name)]
    saved = [(logger, logger.level, list(logger.handlers)) for logger in loggers]
    failure: OutputWriteError | None = None
    try:
        yield setup_logger(output_dir, rank=rank, name=name)
        try:  # a log.txt that could not be written fails the block that ended normally (one line, the file)
            raise_log_write_failure(name)
        except OutputWriteError as err:
            failure = err
    finally:
        closed: list[logging.Handler] = []
        for logger, level, handlers in saved:
            for handler in list(logger.handlers):
                if handler not in handlers:
                    logger.removeHandler(handler)
                    if handler not in closed:
                        closed.append(handler)
            logger.setLevel(level)
        for handler in closed:  # a handler shared with a setup made before the scope stays open
            if not any(handler in logger.handlers for logger in loggers):
                handler.close()
    if failure is not None:
        raise failure


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (False for a file, a pipe, a captured stream)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@contextlib.contextmanager
def progress_bar(
    *,
    total: int | None = None,
    initial: int = 0,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
) -> Iterator[Any]:
    """A tqdm bar on stderr, only when ``enabled`` and stderr is a terminal; otherwise ``None``.

    While the bar lives, the console handlers of the root and project loggers write through
    ``tqdm.write`` (``logging_redirect_tqdm``), so log lines appear above the bar instead of
    garbling it; file handlers are untouched.

    Yields:
        The ``tqdm`` object (call ``update(n)``), or ``None`` when no bar is shown.
    """
    if not (enabled and stderr_is_terminal()):
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Only loggers that have a console handler: logging_redirect_tqdm adds its handler to every logger
    # it is given, and a record that propagates through two of them would be shown twice.
    loggers = [lg for lg in (logging.getLogger(), *map(logging.getLogger, PROJECT_LOGGERS))
               if any(_is_console(h) for h in lg.handlers)]
    with logging_redirect_tqdm(loggers=loggers), tqdm(
        total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
        mininterval=0.5, file=sys.stderr,
    ) as bar:
        yield bar


def log_report(logger: logging.Logger, text: str) -> None:
    """Emits a multi-line report (a metrics table) through ``logger`` at INFO.

    When INFO is off for ``logger`` (logging was not set up: a notebook, a bare script), the text is
    printed to stdout instead, as pycocotools prints its table, so that a table is never lost.
    """
    if logger.isEnabledFor(logging.INFO):
        logger.info("%s", text)
    else:
        print(text, flush=True)

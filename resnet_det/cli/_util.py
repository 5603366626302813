"""What the subcommands share: the one-line error, the config argument, ``--print-config``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from resnet_det.config_files import resolve_config

if TYPE_CHECKING:
    from resnet_det.config import Config


class CommandError(Exception):
    """Bad input found after parsing (a config, an override, a path): ``main`` prints
    ``PROG: error: MESSAGE`` on one line of stderr and exits 2, with no traceback."""


class RunFailedError(Exception):
    """The run stopped for a reason outside its input (a full disk, a lost process, a non-finite loss):
    ``main`` prints ``PROG: error: MESSAGE`` on one line and exits 3; the last complete checkpoint is intact."""


def one_line(exc: BaseException | str) -> str:
    """The message of ``exc`` with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(exc).split()) or type(exc).__name__


def config_help(what: str = "the config") -> str:
    """Help text of a config positional."""
    return (f"{what}: a shipped config's name (e.g. shapes/faster_rcnn_R_50_FPN; `resnet-det configs` lists "
            "them) or a YAML file (a file wins)")


def add_config_arguments(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """The ``CONFIG [key=value ...]`` positionals and ``--print-config`` of train / eval / infer."""
    parser.add_argument("config", nargs="?" if optional else None, metavar="CONFIG", help=config_help())
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides applied after the file, e.g. solver.lr=0.01 train.amp=bf16")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (after _base_ and the overrides) as YAML and exit")


def load_config_arg(ref: str, overrides: Sequence[str]) -> Config:
    """The config named by ``ref`` (a file, or a shipped config's name) with ``overrides`` applied.

    Raises:
        CommandError: An unknown config, an invalid file, a bad override or value (one line).
    """
    from resnet_det.config import load_config

    try:
        return load_config(resolve_config(ref), list(overrides))
    except (FileNotFoundError, ValueError, TypeError) as e:  # the loader's errors name the key and the file
        raise CommandError(one_line(e)) from None


def print_config(cfg: Config) -> None:
    """Writes ``cfg`` to stdout in :func:`resnet_det.config.dump_config`'s YAML (which loads back equal)."""
    from resnet_det.config import dump_config

    with tempfile.TemporaryDirectory() as tmp:
        text = dump_config(cfg, Path(tmp) / "config.yaml").read_text(encoding="utf-8")
    sys.stdout.write(text)
    sys.stdout.flush()


@contextlib.contextmanager
def console_logging() -> Iterator[None]:
    """The project's console logging (:func:`resnet_det_common.setup_logger`: INFO, the format of the
    runs' ``log.txt``) while a command runs, undone after it, so a command called in-process leaves no
    handler behind. Under ``torchrun`` the processes other than rank 0 log warnings only."""
    from resnet_det_common import logging_scope

    with logging_scope(rank=int(os.environ.get("RANK", "0"))):
        yield

"""Crash-safe checkpoints: weights as safetensors, trainer state as plain containers.

A checkpoint ``<name>`` is two files in the output folder:

- ``<name>.safetensors``: the model's state dict (unwrapped from DDP / ``torch.compile``).
- ``<name>.state.pt``: the trainer state (optimizer, scheduler, grad scaler, iteration, data loader
  position and RNG states per rank), made only of dicts, lists, tuples, strings, numbers, None and
  tensors, so that ``torch.load(..., weights_only=True)`` reads it: no pickled objects.

Each file is written by :func:`resnet_det_common.atomic_write` (a temporary dot-file containing
``.tmp-``, which no checkpoint name can contain, flushed, fsync'ed, then renamed over the final name). Only when
both files are in place is the ``last_checkpoint`` pointer replaced, the same way. A process killed
at any moment therefore leaves ``last_checkpoint`` naming a complete, loadable checkpoint (or no
pointer at all before the first save completes). Both files are serialised in memory and written by
Python's own file calls, so a full disk is an ``OSError`` like any other, reported as
:class:`CheckpointWriteError` naming the file, with the previous checkpoint untouched.

The trainer state records the SHA-256 of its weights file: loading checks it, so a weights file
damaged after it was written (or paired with the state of another save) is refused, not loaded.
:meth:`Checkpointer.resume` falls back from a damaged latest checkpoint (truncated, corrupt, missing
a file) to the newest older one that loads, and says so; a file holding pickled objects is refused
and never falls back silently: someone has to look at it.

Every read goes through :func:`resnet_det_common.io.load_weights_only` (``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from resnet_det_common import (
    TMP_MARK,
    all_gather_object,
    atomic_write,
    get_rank,
    get_rng_states,
    get_world_size,
    is_main_process,
    set_rng_states,
    temp_file_owner,
    unwrap_model,
)
from resnet_det_common.io import FileLoadError, describe_os_error, load_weights_only

__all__ = [
    "POINTER_FILE",
    "STATE_SUFFIX",
    "WEIGHTS_SUFFIX",
    "CheckpointError",
    "CheckpointWriteError",
    "Checkpointer",
    "last_checkpoint_name",
    "load_model_weights",
    "make_trainer_state",
]

POINTER_FILE = "last_checkpoint"
WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.pt"
FORMAT_VERSION = 1
_PERIODIC_NAME = re.compile(r"^model_(\d+)$")
_VALID_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

_log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: a file is missing, damaged, not a checkpoint, or does not fit the model.

    Attributes:
        path: The file at fault (None when the message names several).
        damaged: True for a file that is missing, truncated or corrupt (an older checkpoint may
            replace it); False for one that is refused (pickled objects, another model's weights).
    """

    def __init__(self, message: str, path: Path | None = None, *, damaged: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.damaged = damaged


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (a full disk, a read-only folder); the previous checkpoint is intact."""


# --------------------------------------------------------------------------------------------------
# Low-level file writing
# --------------------------------------------------------------------------------------------------


def _to_plain(obj: Any, where: str) -> Any:
    """Returns `obj` with NumPy values turned into Python numbers / tensors, or raises TypeError.

    The result holds only what ``torch.load(weights_only=True)`` accepts, so a state that saves is
    a state that resumes (rather than failing at resume time, hours later).
    """
    if obj is None or type(obj) in (bool, int, float, str, bytes) or isinstance(obj, torch.Tensor):
        return obj
    # Subclasses of builtins (torch.__version__ is a TorchVersion, an IntEnum is an int) are
    # pickled by class and refused by weights_only: store the plain value.
    for base in (bool, int, float, str, bytes):
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _to_plain(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if isinstance(obj, Mapping):
        return {_to_plain(k, f"{where} key"): _to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch.load(weights_only=True) "
        "cannot read back; state_dict() methods must return dicts/lists of numbers, strings and tensors"
    )


def _weights_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as CPU tensors that safetensors accepts.

    safetensors refuses tensors that share memory (tied weights, views of one buffer) and
    non-contiguous tensors; those are cloned, so every key survives and loads strictly.
    """
    state = unwrap_model(model).state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"model state_dict entry {key!r} is a {type(value).__name__}, not a tensor; safetensors "
                "stores tensors only"
            )
        t = value.detach().to("cpu")
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        shared = t.numel() > 0 and ptr in seen
        partial = storage.nbytes() != t.numel() * t.element_size()
        if shared or partial or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        if t.numel() > 0:
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a checkpoint's ``.safetensors`` file and the SHA-256 of its bytes (one read)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights file not found: {path}", path, damaged=True)
    data = path.read_bytes()
    try:
        tensors = safetensors_load(data)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint weights {path} cannot be read ({type(err).__name__}: {_first_line(err)}): it is truncated "
            "or not a safetensors file", path, damaged=True,
        ) from None
    return tensors, hashlib.sha256(data).hexdigest()


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:160]


def load_model_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Reads a ``.safetensors`` weights file (e.g. ``model_final.safetensors``) into a state dict.

    Raises:
        FileNotFoundError: The file does not exist.
        CheckpointError: The file is not a readable safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights file not found: {path}")
    return _read_weights(path)[0]


def _load_trainer_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint trainer state not found: {path} (a checkpoint is <name>{WEIGHTS_SUFFIX} plus "
            f"<name>{STATE_SUFFIX})", path, damaged=True,
        )
    try:
        state = load_weights_only(path, what="checkpoint trainer state")
    except FileLoadError as err:
        raise CheckpointError(str(err), path, damaged=not err.pickled_objects) from None
    if not isinstance(state, dict) or "iteration" not in state:
        raise CheckpointError(
            f"checkpoint trainer state {path} is not a trainer state (it holds a {type(state).__name__}"
            f"{'' if not isinstance(state, dict) else ' without an iteration entry'}); it was not written by "
            "this project's Checkpointer", path, damaged=True,
        )
    return state


# --------------------------------------------------------------------------------------------------
# Trainer state
# --------------------------------------------------------------------------------------------------


def make_trainer_state(
    iteration: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    loader: Any,
    *,
    gather: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Collects everything needed to resume, as plain containers.

    The data loader position and the RNG states differ per process, so they are stored per rank.
    With ``gather=True`` (every process must call this: it is a collective) all ranks are
    collected; with ``gather=False`` only this rank's (used on Ctrl-C, when other processes may
    not reach a collective), and other ranks fall back to rank 0's loader position on resume.

    Args:
        iteration: Completed iterations.
        optimizer: The optimizer.
        scheduler: The learning-rate scheduler (anything with ``state_dict``).
        scaler: The gradient scaler, or None.
        loader: The training loader (``state_dict()`` gives its position), or None.
        gather: Collect per-rank entries from every process.
        extra: More plain entries to store.

    Returns:
        The trainer state dict.
    """
    local = {
        "loader": _to_plain(loader.state_dict(), "loader.state_dict()") if loader is not None else None,
        "rng": get_rng_states(),
    }
    per_rank = all_gather_object(local) if gather else [local]
    ranks = range(len(per_rank)) if gather else [get_rank()]
    state: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "world_size": get_world_size(),
        "torch_version": str(torch.__version__),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "grad_scaler": scaler.state_dict() if scaler is not None else {},
        "loader": {r: entry["loader"] for r, entry in zip(ranks, per_rank)},
        "rng": {r: entry["rng"] for r, entry in zip(ranks, per_rank)},
    }
    if extra:
        state.update(extra)
    return state


# --------------------------------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------------------------------


def last_checkpoint_name(output_dir: str | os.PathLike[str]) -> str | None:
    """The name in ``<output_dir>/last_checkpoint``, or None when it is missing or unreadable.

    Reads only (no clean-up of temporary files, unlike :class:`Checkpointer`): for messages.
    """
    try:
        name = (Path(output_dir) / POINTER_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _VALID_NAME.match(name) and TMP_MARK not in name else None



class Checkpointer:
    """Saves, lists, prunes and loads checkpoints in one output folder.

    Args:
        output_dir: The run's folder (created if missing).
        keep: How many periodic checkpoints (``model_<iteration>``) to keep; older ones are deleted
            after each save. Other names (``model_final``) and the checkpoint named by
            ``last_checkpoint`` are never deleted.

    Example::

        ckpt = Checkpointer("output/run", keep=3)
        ckpt.save("model_0005000", model, make_trainer_state(5000, opt, sched, scaler, loader))
        ckpt.latest()                     # "model_0005000"
        weights, state = ckpt.load("model_0005000")
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, keep: int = 3) -> None:
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"Checkpointer keep must be an int >= 1, got {keep!r}")
        self.output_dir = Path(output_dir)
        self.keep = keep
        self.resumed_from: str | None = None
        """The checkpoint the last :meth:`resume` restored (None: none, started from scratch)."""
        if is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temp_files()

    # -- naming ------------------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: str) -> None:
        if not isinstance(name, str) or not _VALID_NAME.match(name) or TMP_MARK in name:
            raise ValueError(
                f"checkpoint name {name!r} must be letters, digits, '_', '-', '.' (not starting with '.', "
                f"without '{TMP_MARK}'), e.g. 'model_0005000'"
            )
        if name.endswith((WEIGHTS_SUFFIX, STATE_SUFFIX)):
            raise ValueError(f"checkpoint name {name!r} must not include a suffix; give 'model_0005000'")

    def paths(self, name: str) -> tuple[Path, Path]:
        """The (weights, trainer state) files of checkpoint `name` in the output folder."""
        self._check_name(name)
        return self.output_dir / f"{name}{WEIGHTS_SUFFIX}", self.output_dir / f"{name}{STATE_SUFFIX}"

    def _resolve(self, name_or_path: str | os.PathLike[str]) -> tuple[Path, Path]:
        text = os.fspath(name_or_path)
        if os.sep not in text and "/" not in text and not text.endswith((WEIGHTS_SUFFIX, STATE_SUFFIX)):
            return self.paths(text)
        path = Path(text)
        for suffix in (WEIGHTS_SUFFIX, STATE_SUFFIX):
            if path.name.endswith(suffix):
                stem = path.name[: -len(suffix)]
                return path.with_name(stem + WEIGHTS_SUFFIX), path.with_name(stem + STATE_SUFFIX)
        return path.with_name(path.name + WEIGHTS_SUFFIX), path.with_name(path.name + STATE_SUFFIX)

    # -- queries -----------------------------------------------------------------------------------

    def latest(self) -> str | None:
        """The name in ``last_checkpoint`` (the last completely written checkpoint), or None."""
        pointer = self.output_dir / POINTER_FILE
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        try:
            self._check_name(name)
        except ValueError:
            raise CheckpointError(f"{pointer} does not name a checkpoint (it holds {name!r})") from None
        return name

    def latest_or_none(self) -> str | None:
        """:meth:`latest`, or None when the pointer is missing or unreadable (for messages)."""
        return last_checkpoint_name(self.output_dir)

    def list_checkpoints(self) -> list[str]:
        """Names of the complete checkpoints (both files present) in the folder, oldest first.

        Temporary files of interrupted writes never appear: they start with '.' and carry no
        checkpoint suffix.
        """
        names = []
        for p in self.output_dir.glob(f"*{WEIGHTS_SUFFIX}"):
            name = p.name[: -len(WEIGHTS_SUFFIX)]
            if _VALID_NAME.match(name) and (self.output_dir / f"{name}{STATE_SUFFIX}").is_file():
                names.append(name)

        def order(name: str) -> tuple[int, int, str]:
            m = _PERIODIC_NAME.match(name)
            return (0, int(m.group(1)), name) if m else (1, 0, name)

        return sorted(names, key=order)

    # -- writing -----------------------------------------------------------------------------------

    def save(self, name: str, model: nn.Module, trainer_state: Mapping[str, Any]) -> Path | None:
        """Writes checkpoint `name` (only on rank 0; other ranks return None without writing).

        Args:
            name: Checkpoint name, e.g. ``model_0005000`` or ``model_final``.
            model: The model (DDP / compiled wrappers are unwrapped).
            trainer_state: From :func:`make_trainer_state` (plain containers only).

        Returns:
            The weights file written, or None on other ranks.
        """
        self._check_name(name)
        if not is_main_process():
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        weights_path, state_path = self.paths(name)
        tensors = _weights_for_safetensors(model)
        plain_state = _to_plain(dict(trainer_state), "trainer_state")
        metadata = {"format": "pt", "checkpoint": name, "iteration": str(plain_state.get("iteration"))}
        # Serialised in memory and written by us: safetensors' own save_file goes through a
        # `.tmpXXXXXX` file of its own, which a kill would leave behind with no owner to clean it.
        payload = safetensors_bytes(tensors, metadata=metadata)
        del tensors
        # The state names its weights by content: a damaged weights file, or weights and state of two
        # different saves, are refused at load time instead of resuming from the wrong numbers.
        plain_state["weights_sha256"] = hashlib.sha256(payload).hexdigest()
        # torch.save into memory, then our own write: a full disk is then an OSError (torch.save to a
        # path reports it as a RuntimeError of its C++ writer).
        buffer = io.BytesIO()
        torch.save(plain_state, buffer)
        self._write(name, weights_path, payload)
        del payload
        try:
            self._write(name, state_path, buffer.getvalue())
        except CheckpointWriteError:
            weights_path.unlink(missing_ok=True)  # half a checkpoint is never loadable: leave none behind
            raise
        # The pointer moves only now, when both files of `name` are complete and durable.
        self._write(name, self.output_dir / POINTER_FILE, (name + "\n").encode())
        self._prune()
        return weights_path

    def export_weights(self, stem: str, tensors: Mapping[str, torch.Tensor], *, iteration: int) -> Path:
        """Writes weights alone as ``<stem>.safetensors`` (atomically; not a checkpoint: no trainer state,
        the pointer does not move). Used for the EMA weights at the end of training."""
        self._check_name(stem)
        path = self.output_dir / f"{stem}{WEIGHTS_SUFFIX}"
        metadata = {"format": "pt", "checkpoint": stem, "iteration": str(int(iteration))}
        self._write(stem, path, safetensors_bytes(dict(tensors), metadata=metadata))
        return path

    def _write(self, name: str, path: Path, data: bytes) -> None:
        try:
            atomic_write(path, data)
        except OSError as err:
            last = self.latest_or_none()
            kept = f"the last complete checkpoint is still '{last}'" if last else "no checkpoint was completed before"
            raise CheckpointWriteError(
                f"could not write checkpoint file {path}: {describe_os_error(err)}; checkpoint '{name}' was not saved "
                f"and {kept} in {self.output_dir}. Free space there (or fix the folder) and continue with --resume",
                path,
            ) from err

    def _prune(self) -> None:
        complete = [n for n in self.list_checkpoints() if _PERIODIC_NAME.match(n)]
        doomed = set(complete[: max(0, len(complete) - self.keep)])
        # Half of a periodic checkpoint (a save or a prune killed midway) is never loadable: remove it.
        for suffix in (WEIGHTS_SUFFIX, STATE_SUFFIX):
            for p in self.output_dir.glob(f"model_*{suffix}"):
                name = p.name[: -len(suffix)]
                if _PERIODIC_NAME.match(name) and name not in complete:
                    doomed.add(name)
        doomed.discard(self.latest_or_none())
        for name in doomed:
            weights_path, state_path = self.paths(name)
            state_path.unlink(missing_ok=True)
            weights_path.unlink(missing_ok=True)

    def _remove_stale_temp_files(self) -> None:
        """Deletes temporary files left by writers that were killed (their process is gone)."""
        for p in self.output_dir.glob(f".*{TMP_MARK}*"):
            pid = temp_file_owner(p.name)
            if pid is None:
                continue
            if pid != os.getpid() and not _process_alive(pid):
                p.unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------------------------------

    def load(self, name_or_path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Reads a checkpoint (both files) with ``weights_only=True``.

        Args:
            name_or_path: A name in the output folder (``model_0005000``), or a path to either file
                of a checkpoint elsewhere.

        Returns:
            ``(model_state, trainer_state)``, tensors on the CPU.

        Raises:
            CheckpointError: A file is missing, damaged, holds pickled objects, or the weights do not
                match the SHA-256 their trainer state recorded (the file is named in the message).
        """
        weights_path, state_path = self._resolve(name_or_path)
        state = _load_trainer_state(state_path)
        weights, digest = _read_weights(weights_path)
        expected = state.get("weights_sha256")
        if expected is not None and expected != digest:
            raise CheckpointError(
                f"checkpoint weights {weights_path} do not match their trainer state {state_path.name} (SHA-256 "
                f"{digest[:12]} instead of {str(expected)[:12]}): the file was damaged after it was written, or the "
                "two files come from different saves", weights_path, damaged=True,
            )
        return weights, state

    def resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler | None,
        loader: Any,
        *,
        name: str | None = None,
        ema: Any = None,
    ) -> int:
        """Restores the latest (or the named) checkpoint into the given objects.

        Restores the model weights (strictly), the optimizer, the scheduler (so the learning rate
        continues exactly), the grad scaler, this rank's data loader position and RNG states.

        Without ``name``, the checkpoint in ``last_checkpoint`` is used; when its files are damaged
        (truncated, corrupt, missing, or not matching each other) a warning names the file and the
        newest older complete checkpoint that loads is used instead (:attr:`resumed_from` says which).
        A file that holds pickled objects, or weights that do not fit the model, stop the resume.

        Args:
            model: The model (possibly wrapped).
            optimizer: The optimizer, built on the same parameters as when saved.
            scheduler: The scheduler, built with the same schedule.
            scaler: The grad scaler, or None.
            loader: The training loader (``load_state_dict``), or None.
            name: A checkpoint to restore instead of the one in ``last_checkpoint`` (no fallback).
            ema: The weights' EMA (:class:`~.ema.ModelEma`), or None. Restored from the state's ``ema``
                entry; a checkpoint saved without one restarts the average from the resumed weights (with
                a warning).

        Returns:
            The iteration to continue from (0 when there is no checkpoint).

        Raises:
            CheckpointError: No checkpoint can be used (every one tried is named in the message), a
                file holds pickled objects, or the weights do not fit the model.
        """
        self.resumed_from = None
        if name is not None:
            model_state, state = self.load(name)
        else:
            found = self._load_newest_usable()
            if found is None:
                return 0
            name, model_state, state = found
        where = self._resolve(name)[0]
        try:
            unwrap_model(model).load_state_dict(model_state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {where} does not fit this model: {_first_line(err)} (was it saved "
                                  "with another model config?)", where) from err
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            if state.get("ema") is not None:
                try:
                    ema.load_state_dict(state["ema"])
                except ValueError as err:
                    raise CheckpointError(f"checkpoint {where}: {err}", where) from err
            else:
                _log.warning("checkpoint %s has no EMA state (saved without train.ema); the average starts again "
                             "from the resumed weights", name)
                ema.reset(model)
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        scaler_state = state.get("grad_scaler") or {}
        if scaler is not None and scaler.is_enabled():
            if scaler_state:
                scaler.load_state_dict(scaler_state)
            else:
                _log.warning("checkpoint %s has no grad scaler state (saved without fp16); starting anew", name)
        rank = get_rank()
        saved_world = int(state.get("world_size", 1))
        if saved_world != get_world_size():
            _log.warning(
                "checkpoint %s was saved with %d processes, resuming with %d: the data order and random "
                "augmentations will not repeat the original run exactly", name, saved_world, get_world_size(),
            )
        loaders = state.get("loader") or {}
        if loader is not None and loaders:
            entry = loaders.get(rank, loaders.get(0))
            if entry is not None:
                loader.load_state_dict(entry)
        rngs = state.get("rng") or {}
        if rank in rngs:
            set_rng_states(rngs[rank])
        else:
            _log.warning("checkpoint %s has no RNG state for rank %d; keeping this process's seed", name, rank)
        self.resumed_from = name
        return int(state["iteration"])

    def _iteration_of(self, name: str) -> int:
        """The iteration of checkpoint ``name``: from a periodic name, else its weights' metadata (-1 if unknown)."""
        m = _PERIODIC_NAME.match(name)
        if m:
            return int(m.group(1))
        try:
            with safe_open(str(self.paths(name)[0]), framework="pt") as f:
                return int((f.metadata() or {}).get("iteration", -1))
        except Exception:  # a damaged header: unknown
            return -1

    def _load_newest_usable(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The checkpoint of ``last_checkpoint``, or the newest older one that loads when it is damaged.

        Returns None when there is no pointer (no save ever completed: start from scratch).
        """
        pointer = self.output_dir / POINTER_FILE
        problems: list[str] = []
        try:
            latest = self.latest()
        except (CheckpointError, OSError, UnicodeDecodeError) as err:
            latest = None
            problems.append(f"{pointer}: {err}")
        if latest is None and not problems:
            return None
        candidates = [latest] if latest is not None else []
        newest = self._iteration_of(latest) if latest is not None else -1
        older = [n for n in self.list_checkpoints() if n != latest]
        if newest >= 0:
            older = [n for n in older if self._iteration_of(n) < newest]
        candidates += sorted(older, key=self._iteration_of, reverse=True)
        for candidate in candidates:
            try:
                model_state, state = self.load(candidate)
            except CheckpointError as err:
                if not err.damaged:
                    raise
                problems.append(str(err))
                continue
            if problems:
                _log.warning("cannot resume from the latest checkpoint: %s. Resuming from '%s' (iteration %d), the "
                             "newest older checkpoint that loads; the damaged files stay until a save replaces or "
                             "prunes them", "; ".join(problems), candidate, int(state["iteration"]))
            return candidate, model_state, state
        raise CheckpointError(
            f"no checkpoint in {self.output_dir} can be resumed: {'; '.join(problems)}. Delete the damaged files "
            "(or the folder) and train without --resume to start again", self.output_dir / POINTER_FILE,
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True

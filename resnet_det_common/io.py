"""The one atomic file writer and the one ``torch.load``: files are never half written, never unpickled.

Writing: :func:`atomic_write`, so that a reader never sees half a file and a kill never leaves one behind.

The content goes to a temporary file in the same folder (``.<name>.tmp-<pid>-<random>``: a dot-name
no regular output can have, carrying the writer's process id so a later run can tell an orphan from
a file another live process is writing), is flushed and fsync'ed, then renamed over the final name
(``os.replace``, atomic on POSIX and Windows), and the folder is fsync'ed so the rename survives a
power cut. The temporary file is created with the process's normal permissions (umask), unlike
``tempfile.mkstemp``'s 0600.

Reading: :func:`load_weights_only` is the project's only ``torch.load`` (``weights_only=True``: plain
containers and tensors, never an arbitrary pickled object, so a crafted file cannot run code), and it
turns torch's page-long refusals into one line that names the file and says why.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_MARK",
    "FileLoadError",
    "OutputWriteError",
    "atomic_write",
    "describe_os_error",
    "fsync_dir",
    "load_weights_only",
    "temp_file_owner",
    "writing",
]

TMP_MARK = ".tmp-"
_TMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Makes renames in ``folder`` durable; platforms that cannot open folders are ignored."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_file_owner(name: str) -> int | None:
    """The writer's process id if ``name`` is a temporary file of :func:`atomic_write`, else None."""
    m = _TMP_NAME.match(name)
    return int(m.group(1)) if m else None


def atomic_write(
    path: str | os.PathLike[str],
    content: bytes | str | Callable[[Path], None],
    *,
    encoding: str = "utf-8",
    durable: bool = True,
) -> Path:
    """Writes ``content`` to ``path`` atomically (see the module docstring).

    Args:
        path: The final file; its folder is created if missing.
        content: Bytes, text (written with ``encoding``), or ``write(tmp_path)``, a callable that
            writes the temporary file itself (e.g. ``lambda p: torch.save(obj, p)``).
        encoding: Text encoding.
        durable: fsync the file and the folder (off only for throw-away files).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: The write failed (e.g. ``ENOSPC``); the previous file at ``path`` is untouched and
            the temporary file is removed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if callable(content):
            content(tmp)
        else:
            data = content.encode(encoding) if isinstance(content, str) else bytes(content)
            with open(tmp, "xb") as f:
                f.write(data)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(final.parent)
    return final


def describe_os_error(err: OSError) -> str:
    """A short cause for a failed write: ``disk full (ENOSPC: No space left on device)`` and the like."""
    code = err.errno
    name = errno.errorcode.get(code, "") if code is not None else ""
    text = err.strerror or str(err) or type(err).__name__
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"disk full ({name}: {text})"
    return f"{name}: {text}" if name else text


class OutputWriteError(OSError):
    """Writing an output file (metrics, log, plot, evaluation file, config) failed: a full disk, a read-only
    folder. The message is one line naming the file and the cause; ``errno`` is the original one.

    Attributes:
        path: The file.
        what: What it is, e.g. ``"metrics file"``.
    """

    def __init__(self, what: str, path: str | os.PathLike[str], err: OSError) -> None:
        self.message = f"could not write {what} {path}: {describe_os_error(err)}"
        super().__init__(err.errno, self.message)
        self.path = Path(path)
        self.what = what

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turns any ``OSError`` raised inside into an :class:`OutputWriteError` naming ``path`` (one already
    raised for another file passes unchanged)."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as err:
        raise OutputWriteError(what, path, err) from err


class FileLoadError(ValueError):
    """A file that :func:`load_weights_only` refuses: missing, damaged, not a torch file, or pickled objects.

    Attributes:
        path: The file.
        reason: Why, without the file name (for callers that word the message their own way).
        pickled_objects: True when the file holds pickled Python objects (a class, a function call)
            that weights-only loading refuses: never a damaged file, always a file to look at.
    """

    def __init__(self, message: str, path: Path, reason: str, *, pickled_objects: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason
        self.pickled_objects = pickled_objects


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_OPERAND = re.compile(r"Unsupported operand \d+")


def load_weights_only(path: str | os.PathLike[str], *, what: str = "file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Only dicts, lists, tuples, strings, numbers, None and tensors load: a pickled object (whose
    ``__reduce__`` could run any command when unpickled) is refused before anything of it runs.

    Args:
        path: The ``.pt``/``.pth`` file.
        what: What the file is, for the messages (e.g. ``"weights file"``, ``"checkpoint trainer state"``).

    Returns:
        The loaded object, tensors on the CPU.

    Raises:
        FileLoadError: The file does not exist, is damaged or not a torch file, or holds pickled
            objects; the message is one line naming the file, the reason and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileLoadError(f"{what} {path} does not exist", path, "it does not exist")
    import torch  # here, not at the top: the atomic writer and its users must not pay for a torch import

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        pickled = isinstance(err, pickle.UnpicklingError) and _GLOBAL.search(str(err))
        if pickled:
            reason = (f"it holds pickled Python objects (it refers to {pickled.group(1)}), which weights-only "
                      "loading refuses (nothing in it was run): it is not a plain state dict of tensors, or it was "
                      "crafted to run code; re-save it as tensors only (a state dict, or .safetensors), or delete it")
        else:
            operand = _OPERAND.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
            cause = f"{type(err).__name__}: {operand.group(0)}" if operand else _first_line(err)
            reason = f"it is truncated, damaged or not a PyTorch file ({cause})"
        raise FileLoadError(f"{what} {path} cannot be loaded: {reason}", path, reason,
                            pickled_objects=bool(pickled)) from None


def _first_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__

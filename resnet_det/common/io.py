"""The one atomic file writer: a reader never sees half a file, a kill never leaves one behind.

The content goes to a temporary file in the same folder (``.<name>.tmp-<pid>-<random>``: a dot-name
no regular output can have, carrying the writer's process id so a later run can tell an orphan from
a file another live process is writing), is flushed and fsync'ed, then renamed over the final name
(``os.replace``, atomic on POSIX and Windows), and the folder is fsync'ed so the rename survives a
power cut. The temporary file is created with the process's normal permissions (umask), unlike
``tempfile.mkstemp``'s 0600.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["TMP_MARK", "atomic_write", "fsync_dir", "temp_file_owner"]

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

"""The cached, validated COCO index: one process per machine builds it, the other ranks and later runs load it.

Building the index of a train2017-sized file (:func:`~resnet_det.data.coco_index.build_index`) reads and
parses 250 MB of JSON; loading its cache maps one file and checks a CRC. Under ``torchrun`` the first
process of each machine (``LOCAL_RANK`` 0, or global rank 0 without torchrun's variables) loads or builds
and writes the cache while the others wait at a barrier, then load it, so 8 ranks do not pay the parse 8
times.

**Where.** ``<cache_dir>/<P>-<K>.idx`` with ``P`` a hash of the annotation file's resolved path and ``K``
a hash of everything the content depends on: the file's size, modification time (ns) and inode, a content
hash (the whole file up to 64 MiB, else 16 blocks of 64 KiB spread over it plus its first and last MiB),
whether segmentations are required, the source of the validating code and pycocotools' version. A changed
annotation file (or a new version of this library) gives a new name: the stale ``<P>-*`` entries are
deleted when the new one is written. :func:`index_cache_dir` gives the default folder,
``$RESNET_DET_CACHE/coco_index`` or ``~/.cache/resnet_det/coco_index``, for files of at least
:data:`INDEX_CACHE_MIN_BYTES` (smaller ones are indexed in well under a second);
``RESNET_DET_INDEX_CACHE=0`` turns the cache off.

**Format** (never a pickle): 8 magic bytes, the header length (uint64) and the header's CRC-32 (uint32, both
little endian), a JSON header (cache key, categories, ``info``/``licenses``, the validation report, for each
array its dtype, shape and offset, and the CRC-32 of the payload), padding to 64 bytes, then the raw
little-endian arrays. Written with :func:`resnet_det_common.atomic_write`, so a reader sees the whole file or
none. A file that fails any check (magic, CRCs, header, dtypes from a fixed list, sizes, offsets that do not
fit together) is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools

from resnet_det_common import atomic_write, barrier, get_local_rank, get_rank, is_distributed

from . import coco_index
from .coco_index import INDEX_ARRAYS, CocoIndex, DatasetReport, build_index

logger = logging.getLogger(__name__)

__all__ = [
    "INDEX_CACHE_MIN_BYTES",
    "CacheError",
    "cache_path",
    "cached_index",
    "default_cache_dir",
    "index_cache_dir",
    "load_index",
    "save_index",
]

#: Annotation files smaller than this are not cached by default (indexing them takes well under a second).
INDEX_CACHE_MIN_BYTES = 8 * 2**20

_MAGIC = b"RDETIDX\x02"
_PREFIX = 20  # magic, header length, header CRC
_ALIGN = 64
_FULL_HASH_BYTES = 64 * 2**20
_BLOCK = 64 * 2**10
_ALLOWED_DTYPES = {"<i8", "<i4", "|u1", "<f8"}


class CacheError(ValueError):
    """A cache file is damaged, of another format, or for another annotation file."""


def default_cache_dir() -> Path:
    """``$RESNET_DET_CACHE/coco_index`` if the variable is set, else ``~/.cache/resnet_det/coco_index``."""
    base = os.environ.get("RESNET_DET_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "resnet_det") / "coco_index"


def index_cache_dir(ann_file: str | os.PathLike[str]) -> Path | None:
    """The cache folder to use for ``ann_file`` by default: :func:`default_cache_dir`, or None when the file is
    smaller than :data:`INDEX_CACHE_MIN_BYTES`, cannot be read, or ``RESNET_DET_INDEX_CACHE`` is ``0``."""
    if os.environ.get("RESNET_DET_INDEX_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        size = Path(ann_file).stat().st_size
    except OSError:
        return None
    return default_cache_dir() if size >= INDEX_CACHE_MIN_BYTES else None


def _content_hash(path: Path, size: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= _FULL_HASH_BYTES:
            while chunk := f.read(4 * 2**20):
                h.update(chunk)
        else:
            offsets = [0, size - 2**20] + [int(size * k / 17) for k in range(1, 17)]
            for off, n in zip(offsets, [2**20, 2**20] + [_BLOCK] * 16):
                f.seek(off)
                h.update(f.read(n))
    return h.hexdigest()


def _code_hash() -> str:
    h = hashlib.blake2b(digest_size=8)
    for module in (coco_index,):
        try:
            h.update(Path(module.__file__ or "").read_bytes())
        except OSError:  # pragma: no cover - no sources installed
            h.update(module.__name__.encode())
    h.update(pycocotools.__version__.encode() if hasattr(pycocotools, "__version__") else b"")
    return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike[str], ann_file: str | os.PathLike[str], *,
               need_segmentation: bool) -> tuple[Path, dict[str, Any]]:
    """The cache file for ``ann_file`` and the key it must carry (see the module docstring).

    Raises:
        OSError: ``ann_file`` cannot be read.
    """
    path = Path(ann_file).resolve()
    st = path.stat()
    key = {"format": 3, "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
           "content": _content_hash(path, st.st_size), "need_segmentation": bool(need_segmentation),
           "code": _code_hash()}
    prefix = hashlib.blake2b(str(path).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    return Path(cache_dir) / f"{prefix}-{digest}.idx", key


def save_index(path: str | os.PathLike[str], index: CocoIndex, key: dict[str, Any]) -> Path:
    """Writes ``index`` to ``path`` atomically and deletes the stale entries of the same annotation file.

    Raises:
        OSError: The file cannot be written (the previous state is left as it was).
    """
    path = Path(path)
    arrays = {name: np.ascontiguousarray(index.arrays[name], dtype=np.dtype(dt)) for name, (dt, _) in
              INDEX_ARRAYS.items()}
    specs, offset, crc = {}, 0, 0
    for name, arr in arrays.items():
        offset = -(-offset // _ALIGN) * _ALIGN
        specs[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes}
        offset += arr.nbytes
    payload_bytes = offset
    header = {"key": key, "arrays": specs, "payload_bytes": payload_bytes, "categories": index.categories,
              "info": index.info, "licenses": index.licenses, "report": index.report.as_dict()}

    def write(tmp: Path) -> None:
        nonlocal crc
        # the CRC goes in the header, before the payload: compute it first (one pass, no copy)
        pos = 0
        for name, arr in arrays.items():
            pad = specs[name]["offset"] - pos
            crc = zlib.crc32(b"\0" * pad, crc)
            crc = zlib.crc32(memoryview(arr).cast("B"), crc)
            pos = specs[name]["offset"] + arr.nbytes
        text = json.dumps({**header, "crc32": crc}).encode("utf-8")
        head = _MAGIC + struct.pack("<QI", len(text), zlib.crc32(text)) + text
        head += b"\0" * (-len(head) % _ALIGN)
        with open(tmp, "xb") as f:
            f.write(head)
            pos = 0
            for name, arr in arrays.items():
                f.write(b"\0" * (specs[name]["offset"] - pos))
                f.write(memoryview(arr).cast("B"))
                pos = specs[name]["offset"] + arr.nbytes

    atomic_write(path, write)
    prefix = path.name.split("-", 1)[0]
    for stale in path.parent.glob(f"{prefix}-*.idx"):
        if stale.name != path.name:
            stale.unlink(missing_ok=True)
    return path


def load_index(path: str | os.PathLike[str], key: dict[str, Any], *, ann_file: str) -> CocoIndex:
    """Maps a cache file written by :func:`save_index` (arrays are read-only views of the mapping).

    Args:
        path: The cache file.
        key: The key it must carry (from :func:`cache_path`).
        ann_file: The annotation file as the caller named it (for the report).

    Raises:
        FileNotFoundError: No cache file.
        CacheError: Damaged, of another format, or of another key.
    """
    path = Path(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else None
    if mm is None or len(mm) < _PREFIX or mm[:8] != _MAGIC:
        raise CacheError("not an index cache file (bad magic)")
    hlen, hcrc = struct.unpack("<QI", mm[8:_PREFIX])
    if hlen > len(mm) - _PREFIX:
        raise CacheError("header longer than the file")
    text = mm[_PREFIX : _PREFIX + hlen]
    if zlib.crc32(text) != hcrc:
        raise CacheError("header CRC mismatch")
    try:
        header = json.loads(text.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("header is not an object")
        if header.get("key") != key:
            raise CacheError("made for another file or version")
        start = -(-(_PREFIX + hlen) // _ALIGN) * _ALIGN
        payload_bytes = int(header["payload_bytes"])
        if start + payload_bytes != len(mm):
            raise CacheError(f"payload of {len(mm) - start} bytes, expected {payload_bytes}")
        crc = zlib.crc32(memoryview(mm)[start:])
        if crc != header["crc32"]:
            raise CacheError("payload CRC mismatch")
        arrays: dict[str, np.ndarray] = {}
        for name, (dtype, ndim) in INDEX_ARRAYS.items():
            spec = header["arrays"][name]
            shape = tuple(int(s) for s in spec["shape"])
            if spec["dtype"] != dtype or dtype not in _ALLOWED_DTYPES or len(shape) != ndim or min(shape) < 0:
                raise CacheError(f"array {name!r}: unexpected dtype/shape {spec['dtype']} {shape}")
            dt = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            offset = int(spec["offset"])
            if offset < 0 or offset + count * dt.itemsize > payload_bytes or count * dt.itemsize != spec["nbytes"]:
                raise CacheError(f"array {name!r} does not fit in the payload")
            arrays[name] = np.frombuffer(mm, dtype=dt, count=count, offset=start + offset).reshape(shape)
        report = DatasetReport.from_dict({**header["report"], "ann_file": ann_file})
        index = CocoIndex(arrays=arrays, categories=list(header["categories"]), info=header["info"],
                          licenses=header["licenses"], report=report)
        index.check()
    except CacheError:
        raise
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"unreadable header or arrays ({type(e).__name__}: {e})") from None
    return index


def _try_load(path: Path, key: dict[str, Any], ann_file: str) -> CocoIndex | None:
    try:
        start = time.perf_counter()
        index = load_index(path, key, ann_file=ann_file)
    except FileNotFoundError:
        return None
    except (CacheError, OSError) as e:
        logger.warning("index cache %s of %s is unusable (%s); rebuilding it", path, ann_file, e)
        return None
    logger.info("loaded the index of %s from %s in %.2f s", ann_file, path, time.perf_counter() - start)
    return index


def _build_and_save(path: Path, key: dict[str, Any], ann_file: str, need_segmentation: bool) -> CocoIndex:
    start = time.perf_counter()
    index = build_index(ann_file, need_segmentation=need_segmentation)
    built = time.perf_counter() - start
    try:
        save_index(path, index, key)
    except OSError as e:
        logger.warning("could not write the index cache %s (%s); continuing without it", path, e)
    else:
        logger.info("indexed %s in %.1f s; cached as %s (%.1f s to write)", ann_file, built, path,
                    time.perf_counter() - start - built)
    return index


def cached_index(ann_file: str | os.PathLike[str], *, need_segmentation: bool,
                 cache_dir: str | os.PathLike[str] | None) -> tuple[CocoIndex, str]:
    """The validated index of ``ann_file``, from the cache in ``cache_dir`` when possible.

    Every process of a process group must call this together (it has a barrier). The first process of each
    machine loads the cache or builds and writes it; the others wait, then load it (or build the index
    themselves if they cannot, e.g. when the cache folder is not writable). Without ``cache_dir`` each
    process builds its own.

    Args:
        ann_file: The COCO instances file.
        need_segmentation: See :func:`~resnet_det.data.coco_index.build_index`.
        cache_dir: The cache folder, or None for no cache.

    Returns:
        ``(index, source)``, ``source`` being ``"built"`` or ``"cache"``.

    Raises:
        DatasetError: The file is not a usable COCO file (raised on every process).
    """
    name = str(ann_file)
    if cache_dir is None:
        return build_index(ann_file, need_segmentation=need_segmentation), "built"
    try:
        path, key = cache_path(cache_dir, ann_file, need_segmentation=need_segmentation)
    except OSError:  # the annotation file cannot be read: build_index says so in its own words
        path = key = None
    distributed = is_distributed()
    first = not distributed or (get_local_rank() if "LOCAL_RANK" in os.environ else get_rank()) == 0
    index: CocoIndex | None = None
    source = "built"
    error: BaseException | None = None
    if first:
        try:
            if path is not None and key is not None:
                index = _try_load(path, key, name)
                source = "cache" if index is not None else "built"
                if index is None:
                    index = _build_and_save(path, key, name, need_segmentation)
            else:
                index = build_index(ann_file, need_segmentation=need_segmentation)
        except BaseException as e:  # re-raised after the barrier, so that no rank waits forever
            error = e
    if distributed:
        barrier()
    if error is not None:
        raise error
    if index is None:
        if path is not None and key is not None:
            index = _try_load(path, key, name)
            source = "cache" if index is not None else "built"
        if index is None:
            index = build_index(ann_file, need_segmentation=need_segmentation)
    return index, source

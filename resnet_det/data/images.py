"""Image file loading: any common JPEG/PNG flavour to a ``uint8 [H, W, 3]`` RGB array.

Decisions (the same as detectron2's ``read_image(format="RGB")`` and torchvision's
``read_image(mode=RGB)`` where they apply, so results can be compared line by line):

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so the array is the image as a
  viewer shows it. COCO's ``height``/``width`` refer to that orientation.
* Alpha is **dropped**, not composited: an RGBA / LA / palette-with-transparency image keeps the
  colour values stored under its transparent pixels (detectron2 and torchvision do the same).
* Grayscale (``L``, ``1``) is replicated to three channels; palette (``P``) images are expanded
  through their palette; CMYK (including Adobe-inverted CMYK JPEGs, which Pillow decodes) is
  converted with Pillow's naive CMYK->RGB formula (ICC profiles are ignored).
* 16-bit images (Pillow modes ``I;16*`` and ``I``, e.g. 16-bit grayscale PNGs) are scaled to 8 bits
  by ``round(v / 257)`` (65535 -> 255), not clipped. 16-bit RGB(A) PNGs are reduced to 8 bits by
  Pillow itself when opened. Float images (mode ``F``) are clipped to ``[0, 255]``.
* Nothing is decoded before the header has been checked: an image larger than Pillow's decompression-bomb
  limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, about 179 megapixels) is refused when opened, and with
  ``expected_size`` an image whose header gives another size is refused before its pixels are read.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = ["ImageLoadError", "load_image", "open_regular_file"]

_DEFAULT_FIX = ("Check that the file exists, is a complete JPEG/PNG (re-download or re-encode it), or remove it "
                "from the annotation file.")
#: EXIF orientations that swap width and height (transposed / rotated by 90 or 270 degrees).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_16BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class ImageLoadError(ValueError):
    """An image file is missing, unreadable, corrupt or of an unsupported kind.

    Attributes:
        path: The file that could not be loaded.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, fix: str = _DEFAULT_FIX) -> None:
        self.path = str(path)
        super().__init__(f"cannot load image {self.path!r}: {reason}. {fix}")


def _os_error_reason(err: OSError) -> str:
    """``ELOOP: Too many levels of symbolic links`` and the like."""
    name = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    text = err.strerror or str(err) or type(err).__name__
    return f"{name}: {text}" if name else f"{type(err).__name__}: {text}"


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Opens ``path`` for reading if it is a regular file; never blocks, never follows a path into a device.

    The type is checked before opening (``stat``, following symbolic links) and again on the open descriptor
    (``fstat``), and the file is opened non-blocking: a FIFO or a device put at an image's path is refused
    instead of waiting forever for a writer (or reading ``/dev/zero`` forever).

    Raises:
        ImageLoadError: Any ``OSError`` (missing, a symbolic link loop, a name too long, permission denied,
            an I/O error) or a file that is not a regular file; the message names the file and the cause.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ImageLoadError(path, f"it is {_file_kind(st.st_mode)}, not a regular file; not opened")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_BINARY", 0))
    except OSError as e:
        reason = "no such file" if e.errno == errno.ENOENT else _os_error_reason(e)
        raise ImageLoadError(path, reason) from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between the two checks
            raise ImageLoadError(path, f"it is {_file_kind(mode)}, not a regular file; not read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Converts a loaded PIL image of any supported mode to ``uint8 [H, W, 3]`` RGB."""
    mode = im.mode
    if mode == "RGB":
        arr = np.asarray(im)
    elif mode in _16BIT_MODES:
        raw = np.asarray(im).astype(np.float64)
        gray = np.clip(np.rint(raw / 257.0), 0, 255).astype(np.uint8)
        arr = np.repeat(gray[..., None], 3, axis=2)
    elif mode == "F":
        gray = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        arr = np.repeat(gray[..., None], 3, axis=2)
    elif mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info):
        # Through RGBA so that Pillow does not warn about palette transparency; alpha is dropped.
        arr = np.asarray(im.convert("RGBA"))[..., :3]
    else:  # L, 1, P, CMYK, YCbCr, ...
        arr = np.asarray(im.convert("RGB"))
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"unexpected array {arr.dtype} {arr.shape} after converting mode {mode!r}")
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C", copy=True)
    return arr


def _oriented_size(im: Image.Image, apply_exif: bool) -> tuple[int, int]:
    """``(height, width)`` as the image will be returned, from the header alone."""
    w, h = im.size
    if apply_exif:
        try:
            if im.getexif().get(0x0112) in _SWAPPING_ORIENTATIONS:
                w, h = h, w
        except Exception:  # a corrupt EXIF block is ignored, as when the pixels are read
            pass
    return h, w


def load_image(path: str | os.PathLike[str], *, apply_exif: bool = True,
               expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Loads an image file as RGB.

    Args:
        path: A JPEG or PNG file (any format Pillow reads works).
        apply_exif: Rotate/flip the pixels according to the EXIF orientation tag (default, as
            detectron2 does). A corrupt EXIF block is reported (warning) and ignored.
        expected_size: ``(height, width)`` the (EXIF-oriented) image must have, e.g. from the annotation
            file; checked on the header, before any pixel is decoded.

    Returns:
        ``uint8`` array ``[H, W, 3]``, RGB channel order, C-contiguous and writable. ``H, W`` are those of the
        EXIF-oriented image.

    Raises:
        ImageLoadError: The file is missing, truncated, corrupt, not an image, larger than Pillow's
            decompression-bomb limit, not of ``expected_size``, of a pixel mode that cannot be
            converted to RGB, not a regular file (a FIFO or a device is never opened: see
            :func:`open_regular_file`), or reading it raised any ``OSError`` (a symbolic link loop, a name
            too long, an I/O error). The message names the file.
    """
    path = Path(path)
    f = open_regular_file(path)
    try:
        with f, Image.open(f) as im:
            if expected_size is not None:
                h, w = _oriented_size(im, apply_exif)
                if (h, w) != tuple(expected_size):
                    raise ImageLoadError(
                        path, f"it is {w}x{h} on disk but {expected_size[1]}x{expected_size[0]} in the annotations",
                        "Fix the annotation file's height/width (or the image's EXIF orientation).")
            im.load()
            if apply_exif:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        transposed = ImageOps.exif_transpose(im)
                    if transposed is not None:
                        im = transposed
                except Exception as e:  # corrupt EXIF must not make a valid image unusable
                    logger.warning("ignoring unreadable EXIF orientation of %s: %s", path, e)
            return _to_rgb_array(im)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(
            path, f"refused before decoding, as a possible decompression bomb ({e})",
            "Downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if such images are genuine.") from e
    except UnidentifiedImageError as e:  # its message names the open descriptor, not the file
        raise ImageLoadError(path, "UnidentifiedImageError: cannot identify it as an image file (not a format "
                             "Pillow reads)") from e
    except OSError as e:
        raise ImageLoadError(path, f"{type(e).__name__}: {_os_error_reason(e) if e.errno else e}") from e
    except (SyntaxError, ValueError) as e:
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e

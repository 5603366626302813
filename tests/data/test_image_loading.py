"""load_image: every pixel mode becomes correct uint8 RGB; EXIF orientation; clear errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from resnet_det.data.images import ImageLoadError, load_image


def _check_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (h, w, 3)
    assert arr.flags.c_contiguous and arr.flags.writeable


def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    _check_rgb(out, 7, 9)
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_is_replicated_to_three_channels(tmp_path: Path) -> None:
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    _check_rgb(out, 6, 10)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_alpha_is_dropped_keeping_colour(tmp_path: Path) -> None:
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 50
    rgba[..., 3] = 0  # fully transparent: colour under it is kept (not composited)
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    _check_rgb(out, 4, 5)
    assert (out == np.array([200, 100, 50], dtype=np.uint8)).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    # C=0, M=255, Y=255, K=0 is pure red.
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    out = load_image(tmp_path / "c.jpg")
    _check_rgb(out, 16, 16)
    mean = out.reshape(-1, 3).mean(0)
    assert mean[0] > 240 and mean[1] < 15 and mean[2] < 15, mean


def test_palette_png_expands_through_palette(tmp_path: Path) -> None:
    im = Image.new("P", (6, 4))
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9)
    im.putpalette(palette)
    idx = np.zeros((4, 6), dtype=np.uint8)
    idx[:, 2:4], idx[:, 4:] = 1, 2
    im.putdata(idx.flatten().tolist())
    im.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    _check_rgb(out, 4, 6)
    assert (out[:, :2] == [0, 0, 0]).all()
    assert (out[:, 2:4] == [255, 0, 0]).all()
    assert (out[:, 4:] == [0, 255, 0]).all()


def test_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (3, 3))
    im.putpalette([10, 20, 30, 40, 50, 60] + [0] * (256 * 3 - 6))
    im.putdata([0, 1, 0, 1, 0, 1, 0, 1, 0])
    im.info["transparency"] = 0
    im.save(tmp_path / "pt.png", transparency=0)
    out = load_image(tmp_path / "pt.png")
    _check_rgb(out, 3, 3)
    assert tuple(out[0, 0]) == (10, 20, 30)  # colour under the transparent index is kept
    assert tuple(out[0, 1]) == (40, 50, 60)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    raw = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "g16.png"), raw)
    out = load_image(tmp_path / "g16.png")
    _check_rgb(out, 1, 4)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 4])
    assert (out[..., 0] == out[..., 2]).all()


def test_16bit_rgb_png_is_reduced_to_8bit(tmp_path: Path) -> None:
    bgr = np.zeros((2, 3, 3), dtype=np.uint16)
    bgr[..., 2] = 65535  # red in OpenCV's BGR order
    bgr[..., 1] = 257 * 100
    assert cv2.imwrite(str(tmp_path / "c16.png"), bgr)
    out = load_image(tmp_path / "c16.png")
    _check_rgb(out, 2, 3)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 100).all() and (out[..., 2] == 0).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high, red block at the stored top-left; orientation 6 = rotate 90 deg CW
    # for display, so the displayed image is 20 wide x 40 high with the block at the top-right.
    stored = np.full((20, 40, 3), 255, dtype=np.uint8)
    stored[:8, :8] = [255, 0, 0]
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    out = load_image(tmp_path / "rot.jpg")
    _check_rgb(out, 40, 20)
    top_right = out[:6, -6:].reshape(-1, 3).mean(0)
    top_left = out[:6, :6].reshape(-1, 3).mean(0)
    assert top_right[0] > 200 and top_right[1] < 60, top_right
    assert top_left.min() > 200, top_left
    raw = load_image(tmp_path / "rot.jpg", apply_exif=False)
    assert raw.shape == (20, 40, 3)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_corrupt_file_raises_naming_the_file(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "broken_image.jpg"
    if content == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
        path.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(ImageLoadError, match=r"broken_image\.jpg") as info:
        load_image(path)
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(path)


def test_missing_file_raises_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"nothere\.png.*no such file"):
        load_image(tmp_path / "nothere.png")

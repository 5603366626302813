"""The common layer: one atomic writer (normal permissions, all or nothing) and one autocast helper."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from resnet_det.config import Config, dump_config
from resnet_det_common import atomic_write, autocast, check_autocast, temp_file_owner


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_the_umask_permissions_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        a = atomic_write(tmp_path / "a.txt", "hello")
        b = atomic_write(tmp_path / "b.bin", lambda p: p.write_bytes(b"\x00\x01"))
        cfg = dump_config(Config(), tmp_path / "run" / "config.yaml")
    finally:
        os.umask(old)
    assert a.read_text() == "hello" and b.read_bytes() == b"\x00\x01"
    assert _mode(a) == _mode(b) == _mode(cfg) == 0o644  # config.yaml used to be written 0600 (mkstemp)


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "state.txt", "version 1")

    def half_then_fail(p: Path) -> None:
        p.write_text("version 2, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "version 1"
    assert [p.name for p in tmp_path.iterdir()] == ["state.txt"]
    assert temp_file_owner(f".state.txt.tmp-{os.getpid()}-0a1b2c3d") == os.getpid()
    assert temp_file_owner("state.txt") is None


def test_autocast_helper_off_bf16_and_a_clear_error_for_a_bad_value() -> None:
    a = torch.ones(4, 4)
    with autocast("cpu", "off"):
        assert torch.mm(a, a).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.mm(a, a).dtype == torch.bfloat16
    check_autocast("cpu", "bf16")  # supported on the CPU: no error
    with pytest.raises(ValueError, match=r"amp='fp8' is not a precision; use one of \['bf16', 'fp16', 'off'\]"):
        autocast("cpu", "fp8")

"""One logging path (resnet_det.common.logs): console and log.txt get the same records; bars stay out of files."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resnet_det.common import log_report, logging_scope, progress_bar, setup_logger

REPO = Path(__file__).resolve().parents[2]
ESCAPES = re.compile(r"\r|\x1b\[")


def _messages(text: str) -> list[str]:
    """The messages of formatted lines ``[time logger] message``."""
    return [line.split("] ", 1)[1] for line in text.splitlines() if line.startswith("[")]


def test_console_and_log_file_get_the_same_records_and_the_scope_undoes_it(tmp_path, capsys):
    log = logging.getLogger("detection.some.module")
    before = {n: list(logging.getLogger(n).handlers) for n in ("detection", "backbone")}
    with logging_scope(tmp_path):
        log.info("an info line")
        logging.getLogger("backbone.x").warning("a warning")
        log.debug("not shown")
        with logging_scope(tmp_path):  # idempotent: no second console or file handler
            log.info("once")
    log.info("after the scope")  # nothing set up any more: INFO is off again
    err = capsys.readouterr().err
    assert _messages(err) == ["an info line", "WARNING: a warning", "once"]
    assert _messages((tmp_path / "log.txt").read_text()) == _messages(err)
    assert {n: logging.getLogger(n).handlers for n in before} == before


def test_other_ranks_log_warnings_only_and_write_no_file(tmp_path, capsys):
    with logging_scope(tmp_path / "run", rank=1):
        logging.getLogger("detection.x").info("rank 0 only")
        logging.getLogger("detection.x").warning("from every rank")
    assert _messages(capsys.readouterr().err) == ["WARNING: from every rank"]
    assert not (tmp_path / "run").exists()


def test_a_script_with_console_logging_keeps_its_handler(tmp_path, capsys):
    root = logging.getLogger()
    script_handler = logging.StreamHandler(sys.stderr)
    script_handler.setFormatter(logging.Formatter("script: %(message)s"))
    root.addHandler(script_handler)
    try:
        with logging_scope(tmp_path):
            logging.getLogger("segmentation.x").info("shown once")
    finally:
        root.removeHandler(script_handler)
    assert capsys.readouterr().err.splitlines() == ["script: shown once"]  # no second console copy
    assert _messages((tmp_path / "log.txt").read_text()) == ["shown once"]


def test_setup_logger_is_idempotent(tmp_path):
    log = logging.getLogger("resnet_det")
    saved = log.level, list(log.handlers)
    try:
        setup_logger(tmp_path, name="resnet_det")
        setup_logger(tmp_path, name="resnet_det")
        assert len(log.handlers) == len(saved[1]) + 2  # one console, one file
        with pytest.raises(ValueError, match="logger name"):
            setup_logger(tmp_path, name=[])
    finally:
        for h in log.handlers[len(saved[1]):]:
            log.removeHandler(h)
            h.close()
        log.setLevel(saved[0])


def test_a_report_is_logged_when_logging_is_on_and_printed_otherwise(tmp_path, capsys):
    log = logging.getLogger("detection.evaluation.x")
    log_report(log, "TABLE 1")
    assert capsys.readouterr().out == "TABLE 1\n"
    with logging_scope(tmp_path):
        log_report(log, "TABLE 2\nrow")
    captured = capsys.readouterr()
    assert captured.out == "" and "TABLE 2\nrow" in captured.err
    assert "TABLE 2\nrow" in (tmp_path / "log.txt").read_text()


def test_no_progress_bar_when_stderr_is_not_a_terminal():
    with progress_bar(total=10, desc="x") as bar:
        assert bar is None


def test_bar_on_a_terminal_and_log_lines_do_not_break_it(tmp_path):
    # A pseudo-terminal as stderr: the bar is drawn, and a log line goes through tqdm.write (on its own
    # line, the bar redrawn after it) instead of being glued to the bar's last redraw.
    pty = pytest.importorskip("pty")
    import os

    code = textwrap.dedent(f"""
        import logging, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from resnet_det.common import logging_scope, progress_bar
        with logging_scope(None), progress_bar(total=3, desc="bar") as bar:
            assert bar is not None
            bar.update(1); bar.refresh()
            logging.getLogger("detection.x").info("LOGLINE")
            bar.update(2)
    """)
    pid, fd = pty.fork()
    if pid == 0:  # child: stdin/stdout/stderr are the pty (given a size: a 0-column terminal shows no bar)
        import fcntl
        import struct
        import termios

        fcntl.ioctl(2, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        os.execv(sys.executable, [sys.executable, "-c", code])
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert "bar:" in out and "3/3" in out
    line = next(x for x in out.replace("\r\n", "\n").split("\n") if "LOGLINE" in x)
    # tqdm.write clears the bar first: the log line starts on a clean line, not after "bar: 33%|...".
    assert "bar:" not in line.split("\r")[-1]


def test_script_with_stderr_to_a_file_gets_lines_and_no_redraws(tmp_path):
    code = textwrap.dedent(f"""
        import logging, sys
        sys.path.insert(0, {str(REPO)!r})
        from resnet_det.common import logging_scope, progress_bar
        with logging_scope(None), progress_bar(total=3) as bar:
            logging.getLogger("detection.x").info("a line")
            print("bar" if bar is not None else "no bar", file=sys.stderr)
    """)
    with open(tmp_path / "err.txt", "w") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, check=True, timeout=120)
    text = (tmp_path / "err.txt").read_text()
    assert not ESCAPES.search(text)
    assert _messages(text) == ["a line"] and text.endswith("no bar\n")

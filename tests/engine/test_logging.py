"""One logging path (resnet_det_common.logs): console and log.txt get the same records; bars stay out of files."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resnet_det_common import log_report, logging_scope, progress_bar, setup_logger

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
    log = logging.getLogger("resnet_det.evaluation.x")
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
        from resnet_det_common import logging_scope, progress_bar
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
        from resnet_det_common import logging_scope, progress_bar
        with logging_scope(None), progress_bar(total=3) as bar:
            logging.getLogger("detection.x").info("a line")
            print("bar" if bar is not None else "no bar", file=sys.stderr)
    """)
    with open(tmp_path / "err.txt", "w") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, check=True, timeout=120)
    text = (tmp_path / "err.txt").read_text()
    assert not ESCAPES.search(text)
    assert _messages(text) == ["a line"] and text.endswith("no bar\n")


TRAIN_SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {here!r}]
import torch
from engine_fakes import TinyDetector, tiny_loader
from resnet_det.config import SolverConfig
from resnet_det.engine import Trainer, TrainerOptions, build_lr_scheduler, build_optimizer

torch.manual_seed(0)
model = TinyDetector()
cfg = SolverConfig(lr=0.05, max_iter=6, steps=(4,), warmup_iters=1)
opt = build_optimizer(model, cfg)
Trainer(model, opt, build_lr_scheduler(opt, cfg), tiny_loader(), device="cpu", max_iter=6, output_dir={out!r},
        options=TrainerOptions(log_period=2, eval_fn=lambda m, it: {{"bbox": {{"AP": it / 10}}}}, progress=True,
                               curves=False)).train()
"""


def test_training_with_stderr_to_a_file_has_the_lines_and_no_bar_and_log_txt_has_the_same(tmp_path):
    # `make train > log 2>&1` used to fill the file with thousands of \r redraws and [A escape codes.
    out = tmp_path / "run"
    script = TRAIN_SCRIPT.format(repo=str(REPO), here=str(Path(__file__).parent), out=str(out))
    with open(tmp_path / "stderr.txt", "w") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, check=True, timeout=300)
    console = (tmp_path / "stderr.txt").read_text()
    assert not ESCAPES.search(console), console[:500]
    lines = _messages(console)
    assert [x.split("  ")[0] for x in lines if x.startswith("iter ")] == ["iter 2/6", "iter 4/6", "iter 6/6"]
    assert any(x.startswith("evaluation at iteration 6: bbox/AP=0.6") for x in lines)
    assert any(x.startswith("saved checkpoint model_final") for x in lines)
    assert _messages((out / "log.txt").read_text()) == lines  # the same records, in the same order


def test_resume_warnings_reach_the_run_log(tmp_path):
    import torch
    from engine_fakes import TinyDetector, tiny_loader

    from resnet_det.config import SolverConfig
    from resnet_det.engine import Trainer, TrainerOptions, build_lr_scheduler, build_optimizer

    cfg = SolverConfig(lr=0.05, max_iter=4, steps=(3,), warmup_iters=0)

    def trainer(max_iter: int, **kw) -> Trainer:
        torch.manual_seed(0)
        model = TinyDetector()
        opt = build_optimizer(model, cfg)
        return Trainer(model, opt, build_lr_scheduler(opt, cfg), tiny_loader(), device="cpu", max_iter=max_iter,
                       output_dir=tmp_path, options=TrainerOptions(progress=False, curves=False), **kw)

    trainer(2).train()
    trainer(4, scaler=torch.amp.GradScaler("cpu", enabled=True)).train(resume=True)  # saved without a scaler: warned
    log = (tmp_path / "log.txt").read_text()
    assert "WARNING: checkpoint model_final has no grad scaler state" in log
    assert "resumed from model_final at iteration 2" in log


def test_the_dataset_report_goes_through_logging(tiny_coco_src, tmp_path, capsys):
    from resnet_det.data.coco import CocoDetection

    with logging_scope(tmp_path):
        ds = CocoDetection(tiny_coco_src / "images", tiny_coco_src / "annotations.json", training=False)
    assert capsys.readouterr().out == ""  # nothing printed
    log = (tmp_path / "log.txt").read_text()
    assert ds.report.summary().splitlines()[0] in log

"""Run metrics: ``metrics.jsonl``, the training and evaluation lines, a progress bar, TensorBoard, ``curves.png``.

Only the main process writes anything; on other ranks every method is a no-op, so the trainer can
call them unconditionally. Messages and the periodic training lines go through ``logging`` (logger
``resnet_det.engine.logger``): :func:`~resnet_det_common.setup_logger` (or the trainer's logging
scope) sends them to the console and to the run's ``log.txt``. The progress bar is shown only when
stderr is a terminal, and log lines are written around it; otherwise the periodic lines are the
progress, and a log redirected to a file holds no bar redraws.

``metrics.jsonl`` holds one JSON object per line:

- training: ``{"type": "train", "iteration", "total_loss", "losses": {name: value}, "lr",
  "images_per_sec", "data_time", "time", "eta_seconds", ...}`` (losses averaged over the logging
  period and over processes);
- evaluation: ``{"type": "eval", "iteration", "time", "metrics": {name: value}}`` (nested result
  dicts are flattened with "/", e.g. ``bbox/AP``).

A resumed run appends to the same file; readers keep the last record of each iteration.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resnet_det_common import is_main_process, progress_bar, writing

__all__ = ["MetricsLogger", "flatten_metrics", "plot_curves", "read_metrics"]

_log = logging.getLogger(__name__)


def flatten_metrics(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flattens nested result dicts to ``{"bbox/AP": 37.1, ...}``, keeping finite-or-not numbers only."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "/"))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
        elif hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
            flat[name] = float(value.item())
    return flat


def _json_safe(value: float) -> float | str:
    # JSON has no NaN/Infinity; strings keep the lines parseable by any JSON reader.
    return value if math.isfinite(value) else str(value)


def _format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class MetricsLogger:
    """Writes a run's metrics and messages (see the module docstring for the files).

    Args:
        output_dir: The run's folder.
        max_iter: Total iterations (for the progress bar and ETA).
        start_iter: Iteration the bar starts from (a resumed run).
        tensorboard: Also write TensorBoard events to ``<output_dir>/tb``.
        progress: Show a tqdm progress bar (rank 0, and only when stderr is a terminal).
        enabled: Write anything at all; default: on the main process only.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        max_iter: int,
        start_iter: int = 0,
        tensorboard: bool = False,
        progress: bool = True,
        enabled: bool | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = is_main_process() if enabled is None else enabled
        self.max_iter = max_iter
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._bar: Any = None
        self._bar_scope = contextlib.ExitStack()
        self._tb: Any = None
        self._metrics_file: Any = None
        self._write_failed = False
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with writing(self.metrics_path, "metrics file"):
            _drop_partial_last_line(self.metrics_path)
            # Line-buffered appends: a crash loses at most the line being written. The file stays open
            # for the whole run (closed by close()), hence no `with`.
            self._metrics_file = open(self.metrics_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                self.close(plot=False)
                raise ImportError(
                    "train.tensorboard=true needs the 'tensorboard' package: pip install 'resnet-det[tensorboard]' "
                    "(or pip install tensorboard), or set train.tensorboard=false"
                ) from err
            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tb"))
        self._bar = self._bar_scope.enter_context(
            progress_bar(total=max_iter, initial=start_iter, desc="train", enabled=progress)
        )

    # -- messages ----------------------------------------------------------------------------------

    def info(self, message: str) -> None:
        """Logs ``message`` (INFO): the console and the run's ``log.txt`` once logging is set up."""
        if self.enabled:
            _log.info("%s", message)

    def _write_record(self, record: Mapping[str, Any]) -> None:
        try:
            with writing(self.metrics_path, "metrics file"):  # a full disk: one line naming the file
                self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError:
            self._write_failed = True  # close() then drops the unwritable rest quietly: the error is raised once
            raise

    # -- training ----------------------------------------------------------------------------------

    def advance(self, n: int = 1) -> None:
        """Moves the progress bar by `n` iterations (no device synchronisation involved)."""
        if self._bar is not None:
            self._bar.update(n)

    def log_train(
        self,
        iteration: int,
        losses: Mapping[str, float],
        *,
        lr: float,
        images_per_sec: float,
        time_s: float,
        data_time: float | None = None,
        eta_seconds: float | None = None,
        extra: Mapping[str, float] | None = None,
    ) -> None:
        """Records one logging period.

        Args:
            iteration: Completed iterations.
            losses: Averaged loss terms (the total is their sum).
            lr: Learning rate of the last step (first param group).
            images_per_sec: Throughput over the period, all processes together.
            time_s: Seconds since training started (this session).
            data_time: Average seconds per iteration spent waiting for data.
            eta_seconds: Estimated seconds to max_iter.
            extra: More scalars (grad norm, memory).
        """
        if not self.enabled:
            return
        total = float(sum(losses.values()))
        record: dict[str, Any] = {
            "type": "train",
            "iteration": int(iteration),
            "total_loss": _json_safe(total),
            "losses": {k: _json_safe(float(v)) for k, v in losses.items()},
            "lr": lr,
            "images_per_sec": images_per_sec,
            "time": time_s,
        }
        if data_time is not None:
            record["data_time"] = data_time
        if eta_seconds is not None:
            record["eta_seconds"] = eta_seconds
        for k, v in (extra or {}).items():
            record[k] = _json_safe(float(v))
        self._write_record(record)
        terms = "  ".join(f"{k} {v:.4g}" for k, v in losses.items())
        eta = f"  eta {_format_seconds(eta_seconds)}" if eta_seconds is not None else ""
        _log.info("iter %d/%d  loss %.4g  (%s)  lr %.4g  %.1f img/s%s", iteration, self.max_iter, total, terms, lr,
                  images_per_sec, eta)
        if self._bar is not None:
            self._bar.set_postfix(
                {"loss": f"{total:.4g}", "lr": f"{lr:.3g}", "img/s": f"{images_per_sec:.1f}"}, refresh=False
            )
        if self._tb is not None:
            self._tb.add_scalar("train/total_loss", total, iteration)
            for k, v in losses.items():
                self._tb.add_scalar(f"train/{k}", float(v), iteration)
            self._tb.add_scalar("train/lr", lr, iteration)
            self._tb.add_scalar("train/images_per_sec", images_per_sec, iteration)

    def log_eval(self, iteration: int, results: Mapping[str, Any], *, time_s: float | None = None) -> dict[str, float]:
        """Records evaluation results (nested dicts are flattened); returns the flat metrics."""
        flat = flatten_metrics(results)
        if not self.enabled:
            return flat
        record: dict[str, Any] = {
            "type": "eval",
            "iteration": int(iteration),
            "metrics": {k: _json_safe(v) for k, v in flat.items()},
        }
        if time_s is not None:
            record["time"] = time_s
        self._write_record(record)
        if flat:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(flat.items())[:12])
            more = f" (+{len(flat) - 12} more in metrics.jsonl)" if len(flat) > 12 else ""
            self.info(f"evaluation at iteration {iteration}: {shown}{more}")
        else:
            self.info(f"evaluation at iteration {iteration}: no metrics returned")
        if self._tb is not None:
            for k, v in flat.items():
                self._tb.add_scalar(f"eval/{k}", v, iteration)
        return flat

    def close(self, *, plot: bool = True, strict: bool = False) -> Path | None:
        """Closes the files and the bar and, with ``plot``, draws ``curves.png``; returns its path.

        Args:
            plot: Draw ``curves.png``.
            strict: Raise :class:`~resnet_det_common.OutputWriteError` when ``curves.png`` or the rest of
                ``metrics.jsonl`` cannot be written (a full disk); otherwise (closing after another error)
                that is a warning. A plotting problem that is not a write error is always a warning.
        """
        if not self.enabled:
            return None
        self._bar_scope.close()
        self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._metrics_file is not None and not self._metrics_file.closed and self._write_failed:
            with contextlib.suppress(OSError):
                self._metrics_file.close()
        if self._metrics_file is not None and not self._metrics_file.closed:
            try:
                with writing(self.metrics_path, "metrics file"):
                    self._metrics_file.close()
            except OSError as err:
                if strict:
                    raise
                _log.warning("%s", err)
        if plot and self.metrics_path.is_file():
            path = self.output_dir / "curves.png"
            try:
                with writing(path, "plot"):
                    return plot_curves(self.metrics_path, path)
            except OSError as err:
                if strict:
                    raise
                _log.warning("%s", err)
            except Exception as err:  # a plotting problem must never fail a finished training run
                _log.warning("could not draw curves.png: %s: %s", type(err).__name__, err)
        return None


# --------------------------------------------------------------------------------------------------
# Reading and plotting
# --------------------------------------------------------------------------------------------------


def _drop_partial_last_line(path: Path) -> None:
    """Cuts a half-written last line (a write that failed on a full disk) off ``path`` before appending to it,
    so that the next record starts on a line of its own and every line stays valid JSON."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        start = max(0, size - (1 << 20))
        f.seek(start)
        tail = f.read()
        cut = tail.rfind(b"\n")
        f.truncate(start + cut + 1 if cut >= 0 else (0 if start == 0 else size))


def read_metrics(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Reads metrics.jsonl into (train records, eval records), sorted by iteration.

    A resumed run may have logged an iteration twice (once before the interruption, once after);
    the last record of each iteration wins. Unparsable lines (a half-written last line) are skipped.
    """
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or "iteration" not in rec:
                continue
            target = evals if rec.get("type") == "eval" else train
            target[int(rec["iteration"])] = rec
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average that skips non-finite values."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _pick_eval_keys(records: list[dict[str, Any]], limit: int = 6) -> list[str]:
    keys: list[str] = []
    for rec in records:
        for k in rec.get("metrics", {}):
            if k not in keys:
                keys.append(k)

    # Headline metrics first (AP, AP50, mIoU...), then the rest, so per-class entries do not crowd them out.
    def rank(k: str) -> tuple[int, int]:
        leaf = k.rsplit("/", 1)[-1]
        if leaf in ("AP", "mAP", "mIoU", "PQ"):
            return (0, keys.index(k))
        if leaf in ("AP50", "AP75", "mAP50", "fwIoU", "pixel_acc"):
            return (1, keys.index(k))
        if "/" in k and k.count("/") > 1:
            return (3, keys.index(k))
        return (2, keys.index(k))

    return sorted(keys, key=rank)[:limit]


def plot_curves(metrics_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Draws the training curves of a run to a PNG.

    Four panels: total loss (raw and smoothed), each loss term (smoothed), learning rate, and the
    evaluation metrics, all against the iteration.

    Args:
        metrics_path: A ``metrics.jsonl`` file.
        out_path: The PNG to write.

    Returns:
        The PNG path.
    """
    # The object-oriented API with the Agg canvas needs no display and leaves pyplot's global
    # backend alone (the caller may be a notebook).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, evals = read_metrics(metrics_path)
    out_path = Path(out_path)
    fig = Figure(figsize=(13, 9), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    ax_total, ax_terms, ax_lr, ax_eval = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    its = [r["iteration"] for r in train]
    window = max(1, len(its) // 25)

    totals = [_as_float(r.get("total_loss")) for r in train]
    if its:
        ax_total.plot(its, totals, color="tab:blue", alpha=0.35 if window > 1 else 1.0, linewidth=1,
                      label="logged (period average)")
        if window > 1:
            ax_total.plot(its, _smooth(totals, window), color="tab:blue", linewidth=2,
                          label=f"moving average of {window} logs")
        ax_total.legend(loc="upper right")
    ax_total.set(title="Total loss", xlabel="iteration", ylabel="loss")

    names: list[str] = []
    for r in train:
        for k in r.get("losses", {}):
            if k not in names:
                names.append(k)
    positive = True
    for name in names:
        values = [_as_float(r.get("losses", {}).get(name)) for r in train]
        smoothed = _smooth(values, window)
        positive &= all(v > 0 for v in smoothed if math.isfinite(v))
        ax_terms.plot(its, smoothed, linewidth=1.5, label=name)
    if names:
        ax_terms.legend(loc="upper right", fontsize="small")
        if positive:
            ax_terms.set_yscale("log")
    smoothing = f" (moving average of {window} logs)" if window > 1 else ""
    ax_terms.set(title=f"Loss terms{smoothing}", xlabel="iteration", ylabel="loss")

    lrs = [_as_float(r.get("lr")) for r in train]
    if its:
        ax_lr.plot(its, lrs, color="tab:green", linewidth=1.5)
    ax_lr.set(title="Learning rate", xlabel="iteration", ylabel="lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    eval_keys = _pick_eval_keys(evals)
    for key in eval_keys:
        pts = [(r["iteration"], _as_float(r["metrics"].get(key))) for r in evals if key in r.get("metrics", {})]
        ax_eval.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=1.5, label=key)
    if eval_keys:
        ax_eval.legend(loc="lower right", fontsize="small")
    else:
        ax_eval.text(0.5, 0.5, "no evaluation results", ha="center", va="center", transform=ax_eval.transAxes)
    ax_eval.set(title="Evaluation", xlabel="iteration", ylabel="metric")
    if its:
        for ax in (ax_total, ax_terms, ax_lr, ax_eval):
            ax.set_xlim(left=0, right=max(its + [r["iteration"] for r in evals]) * 1.02 or 1)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Training curves: {Path(metrics_path).parent.name}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    return out_path

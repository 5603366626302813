"""Metrics by name: evaluators that the config's ``test.metrics`` adds to a task's own.

A metric is one module defining ``METRIC = Metric(name, build, headline)`` (``build(dataset, output_dir)``
returns a :class:`~resnet_det.evaluation.DatasetEvaluator`) and one line in :data:`BUILTIN`, or a
``register_metric(METRIC)`` call from outside the library. ``test.metrics: [name, ...]`` (checked when the
config loads) runs it beside the task's evaluators, in training's evaluations and in ``resnet-det eval``; its
``headline`` keys join the ``final:`` line of ``resnet-det train``.

This module imports nothing heavy: the config loader reads :func:`metric_names` from it.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .evaluator import DatasetEvaluator

__all__ = ["BUILTIN", "Metric", "build_metric", "get_metric", "metric_names", "register_metric"]

#: The library's metrics: name -> "module:ATTRIBUTE" of their `Metric` (imported on first use).
BUILTIN: dict[str, str] = {
    "detections": "resnet_det.evaluation.stats:METRIC",
}


@dataclass(frozen=True)
class Metric:
    """A named evaluator factory.

    Attributes:
        name: what ``test.metrics`` lists.
        build: ``build(dataset, output_dir) -> DatasetEvaluator`` for the val split (``output_dir`` may be None).
        headline: flattened result keys (``"detections/per_image"``) that ``resnet-det train`` prints at the end.
    """

    name: str
    build: Callable[[Any, Path | None], DatasetEvaluator]
    headline: tuple[str, ...] = ()


_REGISTERED: dict[str, Metric] = {}


def register_metric(metric: Metric) -> None:
    """Make `metric` available to ``test.metrics`` under `metric.name` (a built-in name cannot be replaced)."""
    if not isinstance(metric, Metric):
        raise TypeError(f"register_metric takes a Metric(name, build, headline), got {type(metric).__name__}")
    if metric.name in BUILTIN:
        raise ValueError(f"metric {metric.name!r} is built in; register yours under another name")
    _REGISTERED[metric.name] = metric


def metric_names() -> tuple[str, ...]:
    """Every name ``test.metrics`` accepts."""
    return (*BUILTIN, *(n for n in _REGISTERED if n not in BUILTIN))


def get_metric(name: str) -> Metric:
    """The `Metric` called `name`.

    Raises:
        ValueError: an unknown name (the message lists the known ones and the closest).
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in BUILTIN:
        close = difflib.get_close_matches(name, metric_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown metric {name!r}{hint}; known: {', '.join(metric_names())} (register yours with "
                         "resnet_det.evaluation.registry.register_metric)")
    module, _, attr = BUILTIN[name].partition(":")
    metric = getattr(importlib.import_module(module), attr)
    if not isinstance(metric, Metric) or metric.name != name:
        raise TypeError(f"{BUILTIN[name]} is not a Metric named {name!r}")
    return metric


def build_metric(name: str, dataset: Any, output_dir: Path | None) -> DatasetEvaluator:
    """The evaluator of metric `name` for `dataset`."""
    return get_metric(name).build(dataset, output_dir)
